"""Sets of aten ops that the passes and the liveness walk classify alike: one definition.

``ALIAS_VIEWS``
    outputs share their input's storage (no allocation).  The liveness walk
    follows them to the storage's owner.
``ZERO_PRESERVING``
    a zero input element stays zero at the same logical position (views,
    copies, casts, ``abs``): a sparse input gives a sparse output.
``RESHAPES``
    pure reshapes, the only ops the swap pass walks through when it matches a
    backward recompute chain with its forward twin.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten
prims = torch.ops.prims

RESHAPES = frozenset({aten.view.default, aten._unsafe_view.default, aten.reshape.default})

ALIAS_VIEWS = RESHAPES | {
    aten.permute.default, aten.transpose.int, aten.t.default, aten.squeeze.default, aten.squeeze.dim,
    aten.squeeze.dims, aten.unsqueeze.default, aten.expand.default, aten.slice.Tensor, aten.select.int,
    aten.alias.default, aten.as_strided.default, aten.unfold.default, aten.narrow.default,
    aten.detach.default,
}

ZERO_PRESERVING = (ALIAS_VIEWS - {aten.detach.default}) | {
    aten.clone.default, aten._to_copy.default, prims.convert_element_type.default, aten.abs.default,
}
