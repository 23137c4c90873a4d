"""Critical-token entropy against held-out accuracy over the recipe's checkpoints (issue: checkpoint selection).

For each checkpoint (SFT end, the GRPO checkpoints, the connector export) of a `make demo` run: probe entropy
(the same probe as `CriticalEntropyCallback`: fixed validation prompts, K samples at temperature 1.0) and held-out
accuracy (greedy and T=1), then Spearman rank correlations. Prints a table.

    python -m bench.entropy [--run runs/demo] [--probe 32] [--samples 4] [--limit 150]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (average ranks for ties)."""
    def ranks(x: list[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(x):
            j = i
            while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va and vb else float("nan")


def checkpoints(run: Path) -> list[tuple[str, Path]]:
    """(name, checkpoint or export) in recipe order."""
    out = [("sft", run / "sft" / "export")]
    ckpts = sorted((run / "grpo").rglob("epoch=*-step=*.ckpt"), key=lambda p: int(p.stem.split("step=")[1]))
    out += [(f"grpo@{p.stem.split('step=')[1]}", p) for p in ckpts]
    out.append(("connector", run / "connector" / "export"))
    return out


def load(path: Path, base: Path):
    """A model with the weights of an export folder or a Lightning checkpoint (weights_only)."""
    from modules.common import policy_state
    from modules.loading import load_vlm

    if path.is_dir():
        return load_vlm(path)
    model, processor = load_vlm(base)
    model.load_state_dict(policy_state(torch.load(path, map_location="cpu", weights_only=True)))
    return model, processor


def probe(model, processor, records, samples: int, seed: int) -> dict[str, float]:
    from callbacks.critical_entropy import CriticalEntropyCallback, pool_entropy_sums, stats_from_sums
    from datamodules.prompting import PromptCollator
    from modules.rollout import HFRolloutEngine

    cb = CriticalEntropyCallback(samples_per_prompt=samples)
    engine = HFRolloutEngine(temperature=1.0, max_new_tokens=128)
    engine.setup(model, processor, torch.device("cpu"), seed)
    batch = PromptCollator(processor, mode="rl")(records)
    with torch.no_grad():
        ro = engine.generate(model, batch, samples)
        ents, pos, _ = cb.measure_responses(model.eval(), processor.tokenizer, batch, ro.response_ids,
                                            ro.response_mask, samples)
    return stats_from_sums(pool_entropy_sums(list(zip(ents, pos, strict=True)), cb.words, 2.0, 0), cb.words)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.entropy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--data", default="artifacts/data")
    ap.add_argument("--probe", type=int, default=32)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--limit", type=int, default=150)
    a = ap.parse_args(argv)
    from app.evaluate import evaluate
    from datamodules.vlm_datamodule import load_records

    run, val = Path(a.run), str(Path(a.data) / "validation-*.parquet")
    records, _ = load_records(val, 1.0, limit=a.probe)
    rows = []
    for name, path in checkpoints(run):
        if not path.exists():
            continue
        model, processor = load(path, run / "sft" / "export")
        ent = probe(model, processor, records, a.samples, seed=0)
        greedy = evaluate("", val, 1, 0.0, limit=a.limit, model=model, processor=processor)
        sampled = evaluate("", val, 2, 1.0, limit=a.limit, model=model, processor=processor)
        rows.append({"checkpoint": name, "critical": ent["critical"], "all_tokens": ent["all_tokens"],
                     "critical_rate": ent["critical_rate"], "acc_greedy": greedy["accuracy"],
                     "acc_t1": sampled["accuracy"]})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| checkpoint | critical entropy (nats) | mean entropy | critical words /1000 tok | acc greedy | acc T=1 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['checkpoint']} | {r['critical']:.3f} | {r['all_tokens']:.3f} | {r['critical_rate']:.1f} | "
              f"{r['acc_greedy']:.3f} | {r['acc_t1']:.3f} |")
    for key in ("critical", "all_tokens"):
        for acc in ("acc_greedy", "acc_t1"):
            rho = spearman([r[key] for r in rows], [r[acc] for r in rows])
            print(f"Spearman({key}, {acc}) = {rho:.2f} over {len(rows)} checkpoints")


if __name__ == "__main__":
    main()
