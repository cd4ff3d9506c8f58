"""Soak test of crash safety: real SIGKILLs of a process saving in a loop, and two writers
with a reader, against checkpoints, folder saves and save_pretrained folders.

Each kill lands at a random moment of a loop of saves whose files all encode the save's
number (weights filled with it, the step or config field equal to it); after the kill the
target is loaded and classified:

* ``old`` / ``new``: a consistent save (the one before or the one being written);
* ``error``: a clear library error (SerializationError, a subclass of ValueError);
* ``MIXED``: it loaded, but its parts come from different saves (the failure this guards
  against);
* ``raw``: any other exception.

Leftover temporary files are counted before the next save (which must remove them).

    python benchmarks/soak_crash_safety.py --mode checkpoint --kills 100 --params 26e6
    python benchmarks/soak_crash_safety.py --mode folder --kills 100
    python benchmarks/soak_crash_safety.py --mode pretrained --kills 20 --ema
    python benchmarks/soak_crash_safety.py --mode checkpoint --concurrent 10

Not part of the test suite (tests/test_crash_safety.py runs a bounded version).
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

WRITER = textwrap.dedent(
    """
    import sys, time, torch
    from pathlib import Path
    mode, target, n, parity, seconds, ema = sys.argv[1:7]
    n, parity, seconds, ema = int(float(n)), int(parity), float(seconds), ema == "1"
    target = Path(target)
    step, end = parity, time.monotonic() + seconds
    def more():  # at least one save
        return step == parity or time.monotonic() < end
    if mode == "checkpoint":
        from tinydiff import save_checkpoint
        net = torch.nn.Linear(n, 1, bias=False)
        while more():
            with torch.no_grad():
                net.weight.fill_(step)
            save_checkpoint(target, net, step=step, save_rng=False)
            print(step, flush=True)
            step += 2
    elif mode == "folder":
        from tinydiff._atomic import FolderWriter
        while more():
            with FolderWriter(target) as save:
                save.write_safetensors("model.safetensors", {"w": torch.full((n,), float(step))})
                if ema and step % 4 < 2:
                    save.write_safetensors("ema.safetensors", {"w": torch.full((n,), float(step))})
                save.write_json("config.json", {"step": step, "ema": ema and step % 4 < 2})
            print(step, flush=True)
            step += 2
    else:
        from tinydiff import DiffusionModel
        from tinydiff.nn import MLP
        hidden = max(8, int((n / 3) ** 0.5))
        while more():
            model = DiffusionModel(
                MLP(2, hidden_dim=hidden), input_shape=(2,), min_snr_gamma=float(step + 1)
            )
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(step)
            if ema:
                model.enable_ema(0.9)
            model.save_pretrained(target)
            print(step, flush=True)
            step += 2
    """
)


def _load(mode: str, target: Path, ema: bool) -> str:
    """``"ok <step>"``, ``"MIXED ..."``, ``"error ..."`` or ``"raw ..."``."""
    from tinydiff._safetensors import SerializationError

    try:
        if mode == "checkpoint":
            from tinydiff.checkpoint import read_checkpoint

            state = read_checkpoint(target)
            step, w = state["step"], state["model"]["weight"]
            return f"ok {step}" if bool(w.eq(step).all()) else f"MIXED step {step}, w {w[0, 0]}"
        if mode == "folder":
            from tinydiff._atomic import open_safetensors_member, read_json_member, read_manifest

            manifest = read_manifest(target)
            config = read_json_member(target, "config.json", manifest)
            step = config["step"]
            names = ["model.safetensors"] + (["ema.safetensors"] if config["ema"] else [])
            for name in names:
                with open_safetensors_member(target, name, manifest, max_header_bytes=1 << 20) as f:
                    if not bool(f.get("w").eq(step).all()):
                        return f"MIXED {name} of another save than config step {step}"
            return f"ok {step}"
        from tinydiff import DiffusionModel

        model = DiffusionModel.from_pretrained(target, load_ema=ema)
        step = round(model.config.min_snr_gamma or 0) - 1
        tensors = list(model.nn_module.parameters())
        if ema:
            tensors += [v for k, v in model.ema_state_dict().items() if k.startswith("module.")]
        ok = all(bool(t.eq(step).all()) for t in tensors)
        return f"ok {step}" if ok else f"MIXED config step {step} with other weights"
    except (SerializationError, FileNotFoundError) as err:
        return f"error {type(err).__name__}: {str(err)[:90]}"
    except Exception as err:
        return f"raw {type(err).__name__}: {str(err)[:90]}"


def _temporaries(target: Path) -> list[Path]:
    folder = target if target.is_dir() else target.parent
    return [
        Path(root) / n
        for root, _, names in os.walk(folder)
        for n in names
        if n.startswith(".") and (n.endswith(".tmp") or n.endswith(".tinydiff-tmp"))
    ]


def _writer(mode: str, target: Path, args: argparse.Namespace, parity: int, seconds: float):
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            WRITER,
            mode,
            str(target),
            str(args.params),
            str(parity),
            str(seconds),
            "1" if args.ema else "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )


def kills(args: argparse.Namespace, target: Path) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    rng = random.Random(args.seed)
    first = _writer(args.mode, target, args, 0, 1e9)
    assert first.stdout is not None
    first.stdout.readline()  # one complete save
    first.kill()
    first.wait()
    leftover = 0
    for i in range(args.kills):
        proc = _writer(args.mode, target, args, 1 + 2 * i * 10**5, 1e9)
        assert proc.stdout is not None
        proc.stdout.readline()  # import done and one save complete: kill during the next
        time.sleep(rng.uniform(0, args.window))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        outcome = _load(args.mode, target, args.ema)
        kind = outcome.split()[0]
        counts[kind] += 1
        leftover += len(_temporaries(target))
        if kind in ("MIXED", "raw"):
            print(f"kill {i}: {outcome}")
    counts["temporaries left by the kills (summed)"] = leftover
    last = _writer(args.mode, target, args, 1, 0.0)  # one more save, to completion
    last.wait()
    counts["temporaries left after the next save"] = len(_temporaries(target))
    return counts


def concurrent(args: argparse.Namespace, target: Path) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    seed = _writer(args.mode, target, args, 0, 0.0)
    seed.wait()
    writers = [_writer(args.mode, target, args, p, args.concurrent + 5) for p in (1, 2)]
    for w in writers:
        assert w.stdout is not None
        w.stdout.readline()
    end = time.monotonic() + args.concurrent
    while time.monotonic() < end:
        counts[_load(args.mode, target, args.ema).split()[0]] += 1
    for w in writers:
        w.kill()
        w.wait()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mode", choices=("checkpoint", "folder", "pretrained"), default="checkpoint"
    )
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument(
        "--concurrent", type=float, default=0.0, help="seconds of 2 writers + a reader"
    )
    parser.add_argument("--params", type=float, default=1e6, help="parameters per save")
    parser.add_argument("--ema", action="store_true", help="save EMA weights too")
    parser.add_argument("--window", type=float, default=0.5, help="kill within this many s")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import tinydiff.checkpoint  # noqa: F401  (imported before any timing starts)

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / ("ckpt.safetensors" if args.mode == "checkpoint" else "model")
        counts = concurrent(args, target) if args.concurrent else kills(args, target)
    what = (
        f"{args.concurrent:g} s of 2 writers + a reader"
        if args.concurrent
        else f"{args.kills} SIGKILLs"
    )
    print(f"{args.mode}, {what}, {args.params:g} parameters, ema={args.ema}:")
    for key, value in sorted(counts.items()):
        print(f"  {key:>40}: {value}")


if __name__ == "__main__":
    main()
