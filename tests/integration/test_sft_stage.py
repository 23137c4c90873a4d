"""SFT stage: reply-only loss, connector-only tuning, export round trip, and a stage starting from an export."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning import Trainer

from app.export import export_checkpoint
from app.make_data import write_dataset
from datamodules.prompting import PromptCollator
from datamodules.vlm_datamodule import VLMDataModule, load_records
from modules.common import export_hf
from modules.loading import load_vlm, part_modules
from modules.sft_module import SFTModule, sft_loss


def _data(tmp_path):
    write_dataset(tmp_path / "data", n_train=16, n_val=4, seed=2, quiet=True)
    return tmp_path / "data"


def test_sft_loss_sees_only_the_reply(tiny_model_dir, tmp_path):
    model, processor = load_vlm(tiny_model_dir("internvl"))
    records, _ = load_records(str(_data(tmp_path) / "train-*.parquet"), 1.0, limit=3)
    batch = PromptCollator(processor, mode="sft")(records)
    tok = processor.tokenizer
    for i, r in enumerate(records):  # the labelled tokens are exactly the solution and the end of turn
        labelled = batch.labels[i][batch.labels[i] != -100]
        assert tok.decode(labelled) == r.solution.strip() + tok.eos_token
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.vision).logits
    loss, n = sft_loss(logits, batch.labels)
    total, count = 0.0, 0  # plain loop: position t predicts token t + 1 wherever that token is labelled
    for i in range(len(records)):
        for t in range(batch.labels.shape[1] - 1):
            if batch.labels[i, t + 1] != -100:
                total += float(F.cross_entropy(logits[i, t][None].float(), batch.labels[i, t + 1][None]))
                count += 1
    assert int(n) == count
    assert abs(float(loss) - total / count) < 1e-5
    poked = logits.clone()
    first = int((batch.labels[0] != -100).nonzero()[0]) - 1
    poked[0, : first] += torch.randn_like(poked[0, : first]) * 10  # prompt positions do not matter
    assert abs(float(sft_loss(poked, batch.labels)[0]) - float(loss)) < 1e-6


def test_connector_only_changes_the_connector_and_exports_round_trip(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("internvl")
    data = _data(tmp_path)
    module = SFTModule(str(model_dir), trainable_parts=["connector"], lr=1e-2, warmup_ratio=0.0)
    dm = VLMDataModule(str(data / "train-*.parquet"), processor_path=str(model_dir), mode="sft", batch_size=4)
    trainer = Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                      use_distributed_sampler=False, limit_val_batches=0, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=dm)
    before, processor = load_vlm(model_dir)
    connector = {id(p) for m in part_modules(module.policy)["connector"] for p in m.parameters()}
    after = dict(module.policy.named_parameters())
    for name, p0 in before.named_parameters():
        moved = not torch.equal(p0, after[name].detach())
        assert moved == (id(after[name]) in connector), name

    out = export_hf(module.policy, module.processor, tmp_path / "export")  # the next stage's input
    reloaded, proc2 = load_vlm(out)
    batch = PromptCollator(processor, mode="rl")(load_records(str(data / "validation-*.parquet"), 1.0, limit=2)[0])
    with torch.no_grad():
        a = module.policy.eval()(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.vision)
        b = reloaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.vision)
    assert torch.allclose(a.logits, b.logits, atol=1e-6)
    text = "Wait, let me recount the red circles: 1, 2, 3.</think> \\boxed{3}"
    assert proc2.tokenizer(text)["input_ids"] == processor.tokenizer(text)["input_ids"]

    ckpt = tmp_path / "stage.ckpt"
    trainer.save_checkpoint(ckpt)
    exported = export_checkpoint(ckpt, tmp_path / "from_ckpt")
    again, _ = load_vlm(exported)
    for (n1, p1), (_, p2) in zip(reloaded.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(p1, p2), n1
    SFTModule(str(exported), trainable_parts=["connector"])  # a stage starts from the export


def test_sft_scalars_and_checkpoints_share_the_step(tiny_model_dir, tmp_path):
    """train/loss, val/loss and checkpoint names at global_step after the optimiser step (2 and 4), as in GRPO."""
    from pathlib import Path

    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model_dir = tiny_model_dir("internvl")
    data = _data(tmp_path)
    module = SFTModule(str(model_dir), trainable_parts=["connector"], warmup_ratio=0.0)
    dm = VLMDataModule(str(data / "train-*.parquet"), str(data / "validation-*.parquet"),
                       processor_path=str(model_dir), mode="sft", batch_size=2, val_batch_size=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = Trainer(accelerator="cpu", max_steps=4, log_every_n_steps=2, val_check_interval=2,
                      check_val_every_n_epoch=None, limit_val_batches=1, num_sanity_val_steps=0,
                      enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                      logger=TensorBoardLogger(tmp_path, name="", default_hp_metric=False), callbacks=[ckpt])
    trainer.fit(module, datamodule=dm)
    acc = EventAccumulator(trainer.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4]
    assert [e.step for e in acc.Scalars("val/loss")] == [2, 4]
    assert "step" not in acc.Tags()["scalars"] and "hp_metric" not in acc.Tags()["scalars"]
    assert sorted(p.name for p in Path(ckpt.dirpath).glob("*.ckpt")) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
