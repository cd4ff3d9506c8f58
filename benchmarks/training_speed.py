"""Training-step overhead of DiffusionModel.loss against the bare network.

For each workload, the same batch, timesteps and noise go through

* the floor: ``net(x_t, t)``, an l2 loss against the target, ``.backward()``;
* tinydiff: ``model.loss(x, t=t, noise=noise).mean().backward()``;

interleaved, with warm-up, and the medians are compared. The goal is an overhead of at most 5%.

Run::

    python benchmarks/training_speed.py            # all workloads
    python benchmarks/training_speed.py --quick    # fewer repeats
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from tinydiff import DiffusionModel, DiffusionModelConfig
from tinydiff.nn import MLP, UNet


def timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(
    name: str,
    net: torch.nn.Module,
    shape: tuple[int, ...],
    bsz: int,
    repeats: int,
    device: torch.device,
) -> dict[str, object]:
    net = net.to(device)
    model = DiffusionModel(net, DiffusionModelConfig(input_shape=shape, target_type="pred_eps"))
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn((bsz, *shape), generator=gen, device=device)
    noise = torch.randn((bsz, *shape), generator=gen, device=device)
    t = torch.randint(1, 1001, (bsz,), generator=gen, device=device)
    ab = model.alphas_cumprod.to(device)[t].float().view(-1, *([1] * len(shape)))

    def floor() -> None:
        x_t = ab.sqrt() * x + (1 - ab).sqrt() * noise
        ((net(x_t, t.float()) - noise) ** 2).mean().backward()
        net.zero_grad(set_to_none=True)

    def wrapped() -> None:
        model.loss(x, t=t, noise=noise).mean().backward()
        net.zero_grad(set_to_none=True)

    for _ in range(3):
        floor()
        wrapped()
    times: dict[str, list[float]] = {"floor": [], "tinydiff": []}
    for _ in range(repeats):
        times["floor"].append(timed(floor, device))
        times["tinydiff"].append(timed(wrapped, device))
    f, w = statistics.median(times["floor"]), statistics.median(times["tinydiff"])
    return {"workload": name, "floor_ms": 1e3 * f, "tinydiff_ms": 1e3 * w, "ratio": w / f}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = 15 if args.quick else 50
    workloads = [
        ("MLP 2-d, batch 4096", MLP(2), (2,), 4096),
        ("MLP 64-d, batch 4096", MLP(64, hidden_dim=256), (64,), 4096),
        ("UNet 1x8x8, batch 64", UNet(1, base_channels=32), (1, 8, 8), 64),
        ("UNet 3x32x32, batch 16", UNet(3, base_channels=32), (3, 32, 32), 16),
    ]
    rows = [bench(n, net, s, b, repeats, device) for n, net, s, b in workloads]
    print(
        f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"repeats {repeats} (medians)\n"
    )
    print("| workload | floor (ms) | tinydiff loss (ms) | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['workload']} | {r['floor_ms']:.2f} | {r['tinydiff_ms']:.2f} | {r['ratio']:.3f} |"
        )


if __name__ == "__main__":
    main()
