def available():
    return False
def check_usable():
    raise RuntimeError("not yet")
