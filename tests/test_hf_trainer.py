"""Hugging Face's Trainer with bitfx: ``model.compile(backend="bittrain")``, then ``Trainer(model=model)``.

An OPT built from a config (ReLU FFN; no download) trains a few steps on
CPU; its losses are bit-identical to the same plan stored dense
(``compress=False``) under deterministic algorithms, and its FFN outputs
were bitmap-coded.  Needs the ``hf`` extra (transformers, accelerate).
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=32):
        self.x = torch.randint(3, 256, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _train(tmp_path, compress: bool) -> list[float]:
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=64, activation_function="relu", dropout=0.0,
        attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.OPTForCausalLM(cfg)
    model.compile(backend="bittrain", options={"compress": compress})  # in place: Trainer sees the model's forward
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"out-{compress}"), per_device_train_batch_size=4, max_steps=4, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0, learning_rate=1e-3,
        disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens())
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.slow
def test_trainer_with_model_compile_is_bit_identical_to_the_plan_stored_dense(tmp_path):
    from bitfx import runtime_stats

    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # Inductor's CPU embedding backward adds in thread order otherwise
    try:
        runtime_stats.reset()
        coded = _train(tmp_path, compress=True)
        bitmaps = [r for r in runtime_stats.stats() if r.codec == "bitmap"]
        dense = _train(tmp_path, compress=False)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert len(coded) == 4 and coded == dense
    assert len(bitmaps) == 2 and all(r.calls >= 4 for r in bitmaps)  # each layer's ReLU output, every step
