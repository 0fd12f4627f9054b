"""The benchmark: `python -m tests.bench [--quick] [--json FILE] [--no-docs]`. Not part of the pytest run.

Every row is a ratio or a time measured side by side in the same run: the sides of a comparison alternate (their
order rotates every repetition) and the median over repetitions is reported, because this machine is shared and its
load changes from one second to the next. The table is printed and written into docs/benchmarks.md between the
`bench:start`/`bench:end` markers (the hand-written sections around them are kept), with the machine and versions.

The package: `harness` (rows, table, JSON, docs block, timing), `fixtures` (the in-process training pieces),
`processes` (redis-server, workers, training children), one module per family with its `SECTION`, and `__main__` (the
command line, the sections in their order).

Rows (and the target each is held to):
1. images/s of core's loop (tensor cache + batch augmentation) vs the classic loop (DataLoader + PIL transforms,
   2 workers), same SimpleCNN, same synthetic 32×32 images (≥ 10k), same epochs: ≥ 2.0×.
2. core's loop vs the compute-only bound (forward + backward + step on pre-made tensors): ≥ 0.90.
3. Redis streaming on vs off (worker.streaming's sink against a real redis-server): overhead ≤ 1 %.
4. submit → first step event in Redis on a warm `python -m worker run`: 1 process ≤ 2 s; torchrun 2 gloo ranks ≤ 10 s.
5. ONNX Runtime FP32 vs PyTorch eager (batch 1 and 32; SimpleCNN and ResNet-18 at 32 and 224 px): ≥ 1.5× at batch 1;
   ORT static INT8 vs ORT FP32 at 224 px: ≥ 2×.
6. the digits preset's time to ≥ 0.98 test accuracy: ≤ 20 s, beside the classic recipe's.
7. dashboard render times (job page with 20,000 metric points, jobs page with 1,000 jobs): ≤ 1 s each.
8. memory: peak RSS of a training process running digits; tensor-cache size for 50,000 CIFAR-sized images; the feature
   cache for 10,000 images × 8 views.
9. live viewers (tests/viewers.py): the dashboard server's CPU seconds per viewer-minute with N real Chromium pages on
   a running job's page, the jobs page and the workers page, side by side with N = 0: ≤ 0.6 (1 % of a core).
10. transfer: a frozen-backbone Lite0 job on 400 photo-like images, feature cache vs the current path, whole
   `python -m core.train` time at 3 and 10 epochs (≥ 4× at 10) and the val accuracy of both.
11. shards (tests/bench/shards.py): a dataset beyond the tensor cache read from prepared shards vs the tensor cache
   (whole-epoch images/s ≥ 0.95), the data path alone per core (≥ 2,000 img/s) beside the PIL DataLoader, peak RSS
   of training at 8× vs 1× data.cache_max_mb (≤ 1.10), prepare images/s and bytes per image (raw and JPEG).
12. serving (tests/bench/serving.py): one ONNX model served by `python -m worker serve` with and without batching and
   by `mlflow models serve`, throughput and p50/p99 at 1, 8 and 32 ab clients: batching ≥ 3× MLflow and ≥ 2× no
   batching at 32 clients; p50 at 1 client within 2 ms of ONNX Runtime in-process; an alias moved under load answered
   by the new version within 2 s, no request failed.
On a CUDA machine GPU rows are added (SimpleCNN and ResNet-18 at 32 px, bf16, channels_last, tensor cache on the GPU vs
the classic pipeline). Rows whose prerequisites are missing say "n/a" and why; no number is ever estimated.
"""
