"""Effect of carso.device.keep_freed_memory (glibc mmap/trim thresholds) on an fp32 attack step.

Runs the same forward+backward-to-the-input loop in two fresh processes, with glibc's default allocator
settings and with the tuned ones, and prints throughput, page faults and kernel time side by side.
Run: python bench/allocator.py
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(tuned: bool, batch: int, iters: int) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    from carso.device import keep_freed_memory
    from carso.models import build_classifier

    torch.set_num_threads(2)
    if tuned:
        keep_freed_memory()
    model = build_classifier("cnn_small", in_channels=1, num_classes=10, image_size=28,
                             mean=[0.5], std=[0.25]).eval()
    x, y = torch.rand(batch, 1, 28, 28), torch.zeros(batch, dtype=torch.long)

    def step() -> None:
        xa = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(xa), y), xa)

    for _ in range(3):
        step()
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(iters):
        step()
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {"img_per_s": iters * batch / seconds, "faults": after.ru_minflt - before.ru_minflt,
            "sys_s": after.ru_stime - before.ru_stime, "user_s": after.ru_utime - before.ru_utime}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--child", choices=["default", "tuned"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child == "tuned", args.batch, args.iters)))
        return
    print(f"# cnn_small fp32 forward+backward to the input, batch {args.batch}, {args.iters} iterations, 2 threads")
    print(f"{'allocator':<10}{'img/s':>10}{'page faults':>14}{'kernel s':>10}{'user s':>9}")
    for mode in ("default", "tuned"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--batch", str(args.batch),
                              "--iters", str(args.iters)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout)
        print(f"{mode:<10}{r['img_per_s']:>10.0f}{r['faults']:>14}{r['sys_s']:>10.2f}{r['user_s']:>9.2f}")


if __name__ == "__main__":
    main()
