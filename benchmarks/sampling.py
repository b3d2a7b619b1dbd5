"""Langevin sampling speed: the library's fast path against the textbook's loop, in one run.

    python benchmarks/sampling.py --json reports/bench/sampling.json --plot reports/bench/sampling.png
    python benchmarks/sampling.py --quick          # a few minutes: fewer batches, steps, repeats
    python benchmarks/sampling.py --threads 1      # on a shared machine: see the threads table

Run it in the Makefile's environment (glibc keeping activations in the heap), e.g. ``make -s -f
Makefile --eval 'bench: ; $(BIN)/python benchmarks/sampling.py' bench``, or set
``MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=268435456 MALLOC_TOP_PAD_=67108864`` by hand.
OpenMP's wait policy is picked as the library's entry points pick it (:mod:`ebm.runtime`: OpenMP's
default, spinning, on an idle machine; ``PASSIVE`` when other work would leave a thread without a core),
so the figures are those of the ``ebm`` command and the stage processes; ``OMP_WAIT_POLICY`` set by hand
wins. The run prints and records both.

Wall-clock figures are the measurement; every row also records CPU time, which on a busy machine (at
one thread) still says what a step costs while it runs. The tables print at the end.

Every figure comes from this one process, on identical weights and starting chains:

1. **machine**: cores, torch threads, load average, and the GEMM peak (a large fp32 matmul, best of
   several, measured at the start and the end; the larger counts). A load average above
   ``BUSY_LOAD`` per core before the run, or other work appearing during it, prints a warning: the
   figures are then preliminary and ``cpu_share`` (CPU seconds the timed runs got per wall second
   per thread) says how much of the machine they had.
2. **equivalence**: the textbook loop (``benchmarks/textbook.py``) and ``Langevin.run`` fed the same
   pre-drawn noise must produce the same chains within float tolerance.
3. **throughput**: model × batch. Langevin steps/s and samples/s (= batch × steps/s, chain updates
   per second) of the textbook loop, the library's default (eager) path (``fast``: ``ebm.fastgrad``'s
   hand-written pass for chains of conv/linear/SiLU layers such as the MLPs and CNN28, ``ebm.fastconv``'s
   frozen-weight convolutions under autograd for other conv energies), the same without either
   (``autograd``: plain autograd with frozen weights), the default with the model in
   ``channels_last`` (conv energies), and ``torch.compile`` (``--compile``); GFLOP per step from
   ``torch.utils.flop_counter`` (matmuls and convolutions), achieved GFLOP/s and % of GEMM peak.
   Variants are timed interleaved (A B C A B C ...), so a change of load hits all of them alike.
4. **threads**: the fast path at 1 intra-op thread and at all of them, under OpenMP's default and
   PASSIVE wait policies, each in a fresh process (``--probe``).
5. **compile**: compile seconds (``--cold-compile`` bypasses inductor's on-disk cache), eager vs
   compiled ms/step, and the steps needed to break even.
6. **anatomy** (CNN28, batch 128): each convolution's forward and input-gradient time and GFLOP/s on
   PyTorch's autograd path and on the library's, its FLOP/byte and roofline bound (GEMM peak and a
   measured copy bandwidth), the same FLOPs as one GEMM of the layer's own shape (what MKL makes of
   it), and what the rest (activations, head, update, and the dispatch, Python and allocator overhead
   above them) costs. Then the **ceiling**: rounds that time the textbook step, the library's and the
   floor (every part of the library's step alone, summed) back to back; textbook ÷ floor is the most
   a step with no overhead at all could gain with these kernels, in ratios a load change cannot skew.
7. **scaling**: cost against batch size (from 3), image size (ResNet32 at 16–64 px; its global
   pooling takes any size) and number of steps; ``--plot`` draws the three panels.
"""

# torch is imported after the OpenMP wait policy is chosen (below)
# ruff: noqa: E402
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

# The wait policy must be in the environment before torch loads OpenMP. The threads table's fresh
# processes (--probe) take theirs from the parent, which sets each cell's policy itself.
OMP_WAIT_POLICY_SET_BY_USER = "OMP_WAIT_POLICY" in os.environ
if "--probe" not in sys.argv:
    from ebm.runtime import configure_openmp

    configure_openmp()

import torch
import torch.nn.functional as F
from textbook import library_equivalent, textbook_langevin
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ebm import fastconv
from ebm.checkpoint import write_report_json
from ebm.config import whole_number
from ebm.energies import MLPEnergy, MLPEnergyConfig, energy_and_grad, frozen
from ebm.image_energies import CNN28, CNN28Config, ImageEnergy, ResNet32, ResNet32Config
from ebm.samplers import Langevin

TEXTBOOK_STEP_SIZE = 0.01  # the textbook's s (on the gradient of the mean energy)
BUSY_LOAD = 0.25  # per core: above this before the run starts, someone else is using the machine
BAR_SPEEDUP = 3.0
BAR_PEAK_FRACTION = 0.40
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


# --- the machine ------------------------------------------------------------------------------------


def machine_threads() -> int:
    """Cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0))


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def gemm_peak_gflops(n: int, repeats: int) -> tuple[float, float]:
    """Best fp32 ``n × n`` matmul rate at the current thread count: GFLOP per wall second, and GFLOP
    per CPU second (the rate of one thread while it actually runs, which a busy machine barely changes:
    CPU time adds up every thread's)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    best_wall = best_cpu = math.inf
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        torch.mm(a, b, out=out)
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    flops = 2 * n**3
    return flops / best_wall / 1e9, flops / max(best_cpu, 1e-9) / 1e9


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class LoadLog:
    """Load averages sampled through the run, for the busy-machine warning."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.start = load_average()
        self.samples: list[tuple[str, tuple[float, float, float]]] = [("start", self.start)]

    def mark(self, label: str) -> tuple[float, float, float]:
        load = load_average()
        self.samples.append((label, load))
        return load

    def warnings(self) -> list[str]:
        cores = os.cpu_count() or 1
        notes = []
        if self.start[0] > BUSY_LOAD * cores:
            notes.append(
                f"the machine was busy before this run: load average {self.start[0]:.2f} on {cores} cores "
                f"(quiet is < {BUSY_LOAD * cores:.2f})"
            )
        # While we run, our own threads add up to `threads` to the load; more means others ran too.
        worst = max(load[0] for _, load in self.samples[1:]) if len(self.samples) > 1 else 0.0
        if worst > self.threads + BUSY_LOAD * cores + 0.5:
            notes.append(f"other work ran during this run: load average up to {worst:.2f}")
        return notes


# --- models -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCase:
    name: str
    event_shape: tuple[int, ...]
    is_conv: bool
    build: Callable[[], nn.Module]

    def starting_chains(self, batch: int, generator: torch.Generator) -> Tensor:
        if self.is_conv:  # [0, 1] images, ImageEnergy's convention
            return torch.rand((batch, *self.event_shape), generator=generator)
        return torch.randn((batch, *self.event_shape), generator=generator)


MODELS = {
    case.name: case
    for case in (
        ModelCase("mlp2d", (2,), False, lambda: MLPEnergy(MLPEnergyConfig(2, (128, 128, 128)))),
        ModelCase("tabular30", (30,), False, lambda: MLPEnergy(MLPEnergyConfig(30, (128, 128, 128)))),
        ModelCase("cnn28", (1, 28, 28), True, lambda: ImageEnergy(CNN28(CNN28Config()), (1, 28, 28))),
        ModelCase(
            "resnet32", (3, 32, 32), True, lambda: ImageEnergy(ResNet32(ResNet32Config()), (3, 32, 32))
        ),
    )
}


def seeded_model(case: ModelCase, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return case.build()


def channels_last_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


# --- what is timed --------------------------------------------------------------------------------


def textbook_run(model: nn.Module, x0: Tensor, n_steps: int) -> Callable[[], Any]:
    def run() -> Tensor:
        x = textbook_langevin(model, x0, n_steps, TEXTBOOK_STEP_SIZE)
        model.zero_grad(set_to_none=True)  # the loop leaves weight gradients behind; don't let them pile up
        return x

    return run


def library_run(
    model: nn.Module,
    x0: Tensor,
    n_steps: int,
    *,
    compile: bool = False,
    seed: int = 0,
    fast_paths: bool = True,
) -> Callable[[], Any]:
    """The library's Langevin; ``fast_paths=False`` takes ∇ₓE by plain autograd instead of
    ``ebm.fastgrad``'s hand-written pass or ``ebm.fastconv``'s convolutions."""
    sampler = library_equivalent(TEXTBOOK_STEP_SIZE, x0.shape[0])
    if compile:
        sampler = Langevin(sampler.step_size, sampler.noise_scale, compile=True)
    generator = torch.Generator().manual_seed(seed)

    def run() -> Any:
        with contextlib.nullcontext() if fast_paths else fastconv.disabled():
            return sampler.run(model, x0, n_steps, generator=generator)

    return run


@dataclass
class Timing:
    wall: list[float]
    cpu: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def best(self) -> float:
        return min(self.wall)

    def cpu_share(self, threads: int) -> float:
        return sum(self.cpu) / max(sum(self.wall) * threads, 1e-12)


def time_interleaved(
    runs: dict[str, Callable[[], Any]], *, budget_s: float, max_repeats: int
) -> dict[str, Timing]:
    """Time each run (one warm-up first), interleaved, repeating until ``budget_s`` or ``max_repeats``."""
    warmup = {}
    for name, run in runs.items():
        start = time.perf_counter()
        run()
        warmup[name] = time.perf_counter() - start
    repeats = int(min(max_repeats, max(3, budget_s / max(sum(warmup.values()), 1e-9))))
    timings = {name: Timing([], []) for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            cpu, wall = time.process_time(), time.perf_counter()
            run()
            timings[name].wall.append(time.perf_counter() - wall)
            timings[name].cpu.append(time.process_time() - cpu)
    return timings


# --- FLOPs --------------------------------------------------------------------------------------------


def fast_step_flops(model: nn.Module, x: Tensor) -> int:
    """Matmul and convolution FLOPs of one library step: E(x) and ∇ₓE with frozen weights."""
    counter = FlopCounterMode(display=False)
    with frozen(model), counter, torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        # A view, not the leaf itself, goes into the model: the counter's module hooks cannot follow a
        # leaf through torch.autograd.grad. The arithmetic is energy_and_grad's.
        energy = model(leaf.view_as(leaf))
        torch.autograd.grad(energy.sum(), leaf)
    return counter.get_total_flops()


def textbook_step_flops(model: nn.Module, x: Tensor) -> int:
    """FLOPs of one textbook step, weight gradients included."""
    counter = FlopCounterMode(display=False)
    with counter:
        leaf = x.detach().requires_grad_(True)
        model(leaf).mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


# --- sections -------------------------------------------------------------------------------------


def check_equivalence(case: ModelCase, batch: int, n_steps: int) -> dict[str, Any]:
    """Textbook loop and library sampler on the same weights, chains and pre-drawn noise."""
    model = seeded_model(case)
    generator = torch.Generator().manual_seed(1)
    x0 = case.starting_chains(batch, generator)
    noise = torch.randn((n_steps, *x0.shape), generator=generator)
    x_textbook = textbook_langevin(model, x0, n_steps, TEXTBOOK_STEP_SIZE, noise=noise)
    model.zero_grad(set_to_none=True)
    x_library, _ = library_equivalent(TEXTBOOK_STEP_SIZE, batch).run(model, x0, n_steps, noise=noise)
    max_abs = float((x_textbook - x_library).abs().max())
    moved = float((x_textbook - x0).abs().max())
    return {
        "model": case.name,
        "batch": batch,
        "steps": n_steps,
        "max_abs_diff": max_abs,
        "max_abs_move": moved,
        "same_chain": bool(torch.allclose(x_textbook, x_library, rtol=1e-4, atol=1e-5)),
    }


def throughput_row(
    case: ModelCase, batch: int, n_steps: int, *, compile: bool, budget_s: float, max_repeats: int
) -> dict[str, Any]:
    model = seeded_model(case)
    x0 = case.starting_chains(batch, torch.Generator().manual_seed(2))
    runs = {
        "textbook": textbook_run(model, x0, n_steps),
        "autograd": library_run(model, x0, n_steps, fast_paths=False),
    }
    runs["fast"] = library_run(model, x0, n_steps)
    if case.is_conv:
        runs["fast_cl"] = library_run(
            channels_last_copy(model), x0.contiguous(memory_format=torch.channels_last), n_steps
        )
    if compile:
        torch._dynamo.reset()  # dynamo caches per code object, at most 8 energies: start afresh
        best_layout = channels_last_copy(model) if case.is_conv else model
        x0_best = x0.contiguous(memory_format=torch.channels_last) if case.is_conv else x0
        runs["compiled"] = library_run(best_layout, x0_best, n_steps, compile=True)
    timings = time_interleaved(runs, budget_s=budget_s, max_repeats=max_repeats)
    fast_flops = fast_step_flops(model, x0)
    row: dict[str, Any] = {
        "model": case.name,
        "batch": batch,
        "steps": n_steps,
        "gflop_per_step": fast_flops / 1e9,
        "textbook_gflop_per_step": textbook_step_flops(model, x0) / 1e9,
        "repeats": len(timings["textbook"].wall),
        "cpu_share": min(t.cpu_share(torch.get_num_threads()) for t in timings.values()),
        "variants": {},
    }
    for name, timing in timings.items():
        step_s = timing.median / n_steps
        row["variants"][name] = {
            "ms_per_step": 1e3 * step_s,
            "best_ms_per_step": 1e3 * timing.best / n_steps,
            "steps_per_s": 1 / step_s,
            "samples_per_s": batch / step_s,
            "gflops": fast_flops / 1e9 / step_s,  # useful work: the textbook's weight gradients don't count
            "cpu_ms_per_step": 1e3 * statistics.median(timing.cpu) / n_steps,
        }
    return row


def probe(case: ModelCase, batch: int, n_steps: int, repeats: int) -> dict[str, float]:
    """The library's Langevin (channels_last for conv energies) timed in this process, as it is set up:
    the median of exactly ``repeats`` runs."""
    model = seeded_model(case)
    x0 = case.starting_chains(batch, torch.Generator().manual_seed(3))
    if case.is_conv:
        model, x0 = channels_last_copy(model), x0.contiguous(memory_format=torch.channels_last)
    # An unbounded budget leaves the count to max_repeats (a zero one would give time_interleaved's floor, 3).
    timing = time_interleaved(
        {"fast": library_run(model, x0, n_steps)}, budget_s=math.inf, max_repeats=repeats
    )
    return {
        "ms_per_step": 1e3 * timing["fast"].median / n_steps,
        "cpu_share": timing["fast"].cpu_share(torch.get_num_threads()),
    }


WAIT_POLICIES = ("default", "PASSIVE")
PROBE_REPEATS = 5  # timed runs per --probe cell (its median)


def threads_rows(cases: list[ModelCase], batch: int, n_steps: int, all_threads: int) -> list[dict[str, Any]]:
    """The fast path at 1 and all intra-op threads, under OpenMP's default and passive wait policies.

    The wait policy is read when the OpenMP runtime starts, so each cell is a fresh process
    (``--probe``). With the default policy a thread that reaches a barrier first spins; when the
    other core is busy its partner may not run for a whole scheduler time slice, and every parallel
    op waits for it. PASSIVE threads sleep at once instead.
    """
    rows = []
    for case in cases:
        row: dict[str, Any] = {"model": case.name, "batch": batch}
        for threads in sorted({1, all_threads}):
            for policy in WAIT_POLICIES:
                env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
                if policy != "default":
                    env["OMP_WAIT_POLICY"] = policy
                command = [sys.executable, __file__, "--probe", case.name, str(batch), str(n_steps)]
                command += ["--threads", str(threads)]
                done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    print(f"probe {' '.join(command[2:])} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                    result = {"ms_per_step": math.nan, "cpu_share": math.nan}
                else:
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                row[f"{threads}t_{policy}"] = result["ms_per_step"]
                row[f"{threads}t_{policy}_cpu_share"] = result["cpu_share"]
        rows.append(row)
    return rows


def compile_rows(cases: list[ModelCase], batch: int, n_steps: int, budget_s: float) -> list[dict[str, Any]]:
    rows = []
    for case in cases:
        model = seeded_model(case)
        x0 = case.starting_chains(batch, torch.Generator().manual_seed(4))
        if case.is_conv:
            model, x0 = channels_last_copy(model), x0.contiguous(memory_format=torch.channels_last)
        torch._dynamo.reset()  # a fresh compile (dynamo caches per code object, at most 8 energies)
        start = time.perf_counter()
        with frozen(model):
            energy_and_grad(model, x0, compile=True)  # compiles (or falls back, with a warning)
        compile_s = time.perf_counter() - start
        timings = time_interleaved(
            {
                "eager": library_run(model, x0, n_steps),
                "compiled": library_run(model, x0, n_steps, compile=True),
            },
            budget_s=budget_s,
            max_repeats=9,
        )
        eager_ms = 1e3 * timings["eager"].median / n_steps
        compiled_ms = 1e3 * timings["compiled"].median / n_steps
        gain_ms = eager_ms - compiled_ms
        rows.append(
            {
                "model": case.name,
                "batch": batch,
                "compile_s": compile_s,
                "eager_ms_per_step": eager_ms,
                "compiled_ms_per_step": compiled_ms,
                "break_even_steps": (1e3 * compile_s / gain_ms) if gain_ms > 0 else None,
            }
        )
    return rows


def _times(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn``, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    return statistics.median(_times(fn, repeats))


def memory_bandwidth_gbs(n_bytes: int = 256 * 2**20, repeats: int = 3) -> float:
    """Best copy rate between two ``n_bytes`` buffers (the fastest of ``repeats`` copies), counting read
    plus write: GB/s."""
    source = torch.ones(n_bytes // 4)
    target = torch.empty_like(source)
    target.copy_(source)
    return 2 * n_bytes / min(_times(lambda: target.copy_(source), repeats)) / 1e9


def model_output_size(conv: nn.Conv2d, inp: Tensor) -> tuple[int, int]:
    """``(H', W')`` of ``conv`` applied to ``inp``."""
    sizes = []
    for dim in range(2):
        padding = cast(tuple[int, int], conv.padding)[dim]
        span = conv.dilation[dim] * (conv.kernel_size[dim] - 1) + 1
        sizes.append((inp.shape[2 + dim] + 2 * padding - span) // conv.stride[dim] + 1)
    return sizes[0], sizes[1]


def conv_layer_ms(
    conv: nn.Conv2d, inp: Tensor, repeats: int, *, seed: int, library_only: bool = False
) -> dict[str, float]:
    """Median ms of ``conv``'s forward and input gradient: PyTorch's autograd path (NCHW tensors,
    oneDNN backward-data), the library's (channels_last, ``ebm.fastconv``'s route), and the same FLOPs
    as one GEMM of the convolution's own shape (im2col's: ``(B·H'·W', C_in·kh·kw) × (C_in·kh·kw, C_out)``
    forward, ``(B·H'·W', C_out) × (C_out, C_in·kh·kw)`` for the input gradient, without the im2col and
    col2im around it). ``library_only``: the library's two alone."""
    weight = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else None
    stride, padding = cast(tuple[int, int], conv.stride), cast(tuple[int, int], conv.padding)
    grad_out = torch.randn(
        (inp.shape[0], conv.out_channels, *model_output_size(conv, inp)),
        generator=torch.Generator().manual_seed(seed),
    )
    inp_cl, weight_cl = fastconv.channels_last(inp), fastconv.channels_last(weight)
    grad_out_cl = fastconv.channels_last(grad_out)

    def onednn_input_grad(grad: Tensor, inp: Tensor, weight: Tensor) -> Tensor:
        mask = [True, False, False]
        return torch.ops.aten.convolution_backward(
            grad, inp, weight, None, list(stride), list(padding), [1, 1], False, [0, 0], 1, mask
        )[0]

    def library_input_grad() -> Tensor:
        if conv.in_channels <= fastconv.GEMM_INPUT_GRAD_MAX_IN_CHANNELS:
            size = (inp.shape[-2], inp.shape[-1])
            return fastconv.input_grad_by_gemm(grad_out_cl, weight_cl, size, stride, padding, (1, 1))
        return onednn_input_grad(grad_out_cl, inp_cl, weight_cl)

    timed = {
        "library_forward": lambda: F.conv2d(inp_cl, weight_cl, bias, stride, padding),
        "library_input_grad": library_input_grad,
    }
    if not library_only:
        rows = grad_out.shape[0] * grad_out.shape[2] * grad_out.shape[3]
        columns = torch.randn((rows, weight[0].numel()), generator=torch.Generator().manual_seed(seed))
        dy = grad_out.permute(0, 2, 3, 1).reshape(rows, -1)  # a copy: the GEMM reads it row-major
        w = weight.reshape(weight.shape[0], -1)
        timed |= {
            "autograd_forward": lambda: F.conv2d(inp, weight, bias, stride, padding),
            "autograd_input_grad": lambda: onednn_input_grad(grad_out, inp, weight),
            "gemm_forward": lambda: columns @ w.T,
            "gemm_input_grad": lambda: dy @ w,
        }
    return {name: 1e3 * _median_time(fn, repeats) for name, fn in timed.items()}


def conv_inputs(model: nn.Module, x: Tensor) -> dict[nn.Conv2d, Tensor]:
    """Each convolution of ``model`` and what it convolves when ``model`` runs on ``x`` (contiguous)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    inputs: dict[nn.Conv2d, Tensor] = {}

    def keep_input(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        inputs[cast(nn.Conv2d, module)] = args[0].detach().contiguous()

    hooks = [conv.register_forward_hook(keep_input) for conv in convs]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return {conv: inputs[conv] for conv in convs}


def ceiling(batch: int, n_steps: int, rounds: int, repeats: int) -> dict[str, Any]:
    """The most these kernels let the CNN28 step gain on the textbook loop, timed beside it.

    Each round times, back to back on one model and one batch: the textbook loop's step and the
    library's (``n_steps`` each), then the floor, every part of the library's step timed alone and summed
    (the convolutions by the library's routes, :func:`conv_layer_ms`, and :func:`non_conv_floor_ms`).
    Load changes between rounds hit a round's three alike, so a round's ratios hold where its times do
    not. ``ceiling`` (textbook ÷ floor, median over rounds) is the speed-up of a step with no overhead at
    all: no dispatch, Python or allocator, and no cache misses between kernels.
    """
    case = MODELS["cnn28"]
    model = seeded_model(case)
    x = case.starting_chains(batch, torch.Generator().manual_seed(5))
    inputs = conv_inputs(model, x)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    runs = {
        "textbook": textbook_run(model, x, n_steps),
        "library": library_run(channels_last_copy(model), x_cl, n_steps),
    }
    for run in runs.values():
        run()
    rows = []
    for _ in range(rounds):
        row = {}
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            row[f"{name}_ms"] = 1e3 * (time.perf_counter() - start) / n_steps
        row["conv_ms"] = sum(
            sum(conv_layer_ms(conv, inp, repeats, seed=index, library_only=True).values())
            for index, (conv, inp) in enumerate(inputs.items())
        )
        row["floor_ms"] = row["conv_ms"] + sum(non_conv_floor_ms(model, x, repeats).values())
        rows.append(row)

    return {
        "batch": batch,
        "steps": n_steps,
        "rounds": rows,
        "speedup": median_ratio(rows, "library_ms"),
        "ceiling": median_ratio(rows, "floor_ms"),
        "convolutions_only_ceiling": median_ratio(rows, "conv_ms"),
    }


def median_ratio(rows: list[dict[str, float]], part: str) -> float:
    """The median over interleaved rounds of the textbook's time over ``part``'s: a speed-up."""
    return statistics.median(r["textbook_ms"] / r[part] for r in rows)


def anatomy(batch: int, repeats: int, peak: float, bandwidth: float, step_ms: float) -> dict[str, Any]:
    """Each convolution of CNN28 (real weights and activations) timed alone, on PyTorch's autograd path
    (NCHW, oneDNN backward-data) and on the library's (``ebm.fastconv``), with a roofline bound.

    The roofline bound of a layer is ``min(peak, intensity × bandwidth)``, intensity being its FLOPs
    over the bytes it must move at least (input, output and weight, fp32, once each). ``step_ms`` is
    the library's eager channels_last step (the throughput table's ``fast_cl`` variant, an interleaved
    median): the step whose parts the floor times, split here into those parts.
    """
    model = seeded_model(MODELS["cnn28"])
    x = MODELS["cnn28"].starting_chains(batch, torch.Generator().manual_seed(5))
    layers, conv_ms, gemm_ms = [], 0.0, 0.0
    for index, (conv, inp) in enumerate(conv_inputs(model, x).items()):
        out_numel = batch * conv.out_channels * math.prod(model_output_size(conv, inp))
        flops = 2 * out_numel * conv.in_channels * math.prod(conv.kernel_size)
        n_bytes = 4 * (inp.numel() + out_numel + conv.weight.numel())
        ms = conv_layer_ms(conv, inp, repeats, seed=index)
        conv_ms += ms["library_forward"] + ms["library_input_grad"]
        gemm_ms += ms["gemm_forward"] + ms["gemm_input_grad"]
        by_gemm = conv.in_channels <= fastconv.GEMM_INPUT_GRAD_MAX_IN_CHANNELS
        layers.append(
            {
                "layer": f"conv{index + 1} {conv.in_channels}→{conv.out_channels} k{conv.kernel_size[0]} "
                f"s{conv.stride[0]} on {inp.shape[-1]}px",
                "mflop": flops / 1e6,
                "flop_per_byte": flops / n_bytes,
                "roofline_gflops": min(peak, flops / n_bytes * bandwidth),
                "library_input_grad_route": "GEMM + col2im" if by_gemm else "oneDNN channels_last",
                **{f"{name}_ms": value for name, value in ms.items()},
                **{f"{name}_gflops": flops / value / 1e6 for name, value in ms.items()},
            }
        )
    rest = non_conv_floor_ms(model, x, repeats)
    floor_ms = conv_ms + sum(rest.values())
    return {
        "batch": batch,
        "layers": layers,
        "conv_ms_per_step": conv_ms,
        "same_shape_gemm_ms_per_step": gemm_ms,
        "step_ms": step_ms,
        "other_ms_per_step": step_ms - conv_ms,
        **{f"{name}_ms_per_step": value for name, value in rest.items()},
        "floor_ms_per_step": floor_ms,
        "overhead_ms_per_step": step_ms - floor_ms,
        "memory_bandwidth_gbs": bandwidth,
    }


def non_conv_floor_ms(model: nn.Module, x: Tensor, repeats: int) -> dict[str, float]:
    """What a CNN28 step must spend besides its convolutions, each part timed alone (median ms):

    * ``activation``: every SiLU's forward and gradient (``aten::silu_backward``) on the real
      pre-activations, in the memory format the library's step has them;
    * ``head``: the dense layers' forward and input gradient, and the logsumexp and its gradient;
    * ``update``: the Langevin update of the chains (per-chain gradient norm, clip, step, fresh
      Gaussian noise, clamp).

    With the convolutions' own time this is a floor for the eager step: what remains of a measured
    step above it is per-operator dispatch, Python and the allocator (and autograd's bookkeeping on
    energies the hand-written pass cannot take).
    """
    silus = [m for m in model.modules() if isinstance(m, nn.SiLU)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    inputs: dict[nn.Module, Tensor] = {}

    def keep_input(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        inputs[module] = args[0].detach()

    hooks = [m.register_forward_hook(keep_input) for m in silus + linears]
    with frozen(model), torch.no_grad(), fastconv.for_energy(model, x):
        logits = cast(ImageEnergy, model).logits(x)
    for hook in hooks:
        hook.remove()
    grads = {m: torch.ones_like(inputs[m]) for m in silus}

    def activations() -> None:
        for m in silus:
            F.silu(inputs[m])
            torch.ops.aten.silu_backward(grads[m], inputs[m])

    def head() -> None:
        for m in linears:
            out = F.linear(inputs[m], m.weight.detach(), m.bias.detach())
            torch.mm(torch.ones_like(out), m.weight.detach())
        torch.logsumexp(logits, dim=1).sum()
        torch.softmax(logits, dim=1)

    chains, grad = x.clone(), torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    noise, generator = torch.empty_like(chains), torch.Generator().manual_seed(9)

    def update() -> None:
        norm = grad.flatten(1).norm(dim=1)
        clipped = grad * (1.0 / norm.clamp(min=1.0)).view(-1, 1, 1, 1)
        chains.add_(clipped, alpha=-0.01)
        chains.add_(noise.normal_(generator=generator), alpha=0.005)
        chains.clamp_(0.0, 1.0)

    return {
        name: 1e3 * _median_time(fn, repeats)
        for name, fn in {"activation": activations, "head": head, "update": update}.items()
    }


def image_size_rows(sizes: list[int], batch: int, n_steps: int, budget_s: float) -> list[dict[str, Any]]:
    case = MODELS["resnet32"]
    model = seeded_model(case)
    rows = []
    for size in sizes:
        sized = ImageEnergy(cast(nn.Module, model.logits_net), (3, size, size))
        x0 = torch.rand((batch, 3, size, size), generator=torch.Generator().manual_seed(6))
        timings = time_interleaved(
            {
                "textbook": textbook_run(sized, x0, n_steps),
                "fast_cl": library_run(
                    channels_last_copy(sized), x0.contiguous(memory_format=torch.channels_last), n_steps
                ),
            },
            budget_s=budget_s,
            max_repeats=5,
        )
        rows.append(
            {
                "model": "resnet32",
                "image_size": size,
                "batch": batch,
                "gflop_per_step": fast_step_flops(sized, x0) / 1e9,
                **{f"{name}_ms_per_step": 1e3 * t.median / n_steps for name, t in timings.items()},
            }
        )
    return rows


def steps_rows(step_counts: list[int], batch: int, budget_s: float) -> list[dict[str, Any]]:
    case = MODELS["cnn28"]
    model = seeded_model(case)
    x0 = case.starting_chains(batch, torch.Generator().manual_seed(7))
    model_cl, x0_cl = channels_last_copy(model), x0.contiguous(memory_format=torch.channels_last)
    rows = []
    for n_steps in step_counts:
        timings = time_interleaved(
            {"textbook": textbook_run(model, x0, n_steps), "fast_cl": library_run(model_cl, x0_cl, n_steps)},
            budget_s=budget_s,
            max_repeats=5,
        )
        rows.append(
            {
                "model": "cnn28",
                "batch": batch,
                "steps": n_steps,
                **{f"{k}_s": t.median for k, t in timings.items()},
            }
        )
    return rows


# --- report ---------------------------------------------------------------------------------------


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    print(f"\n{title}")
    cells = [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def print_throughput(rows: list[dict[str, Any]], peak: float, n_steps: int) -> None:
    names = list(dict.fromkeys(name for r in rows for name in r["variants"]))
    library = [name for name in names if name != "textbook"]
    print_table(
        "CPU ms per step (process CPU time: what the step costs while it runs; compare with wall ms when "
        "the cpu share is low)",
        ["model", "batch", *names, *(f"{n} ×" for n in library)],
        [
            [r["model"], r["batch"]]
            + [r["variants"][n]["cpu_ms_per_step"] if n in r["variants"] else "-" for n in names]
            + [
                r["variants"]["textbook"]["cpu_ms_per_step"] / r["variants"][n]["cpu_ms_per_step"]
                if n in r["variants"]
                else "-"
                for n in library
            ]
            for r in rows
        ],
    )
    print_table(
        f"Langevin ms per step ({n_steps} steps per run, median of interleaved repeats) and speed-up "
        "over the textbook loop",
        ["model", "batch", "textbook", *(f"{n}" for n in library), *(f"{n} ×" for n in library), "cpu share"],
        [
            [r["model"], r["batch"], r["variants"]["textbook"]["ms_per_step"]]
            + [r["variants"][n]["ms_per_step"] if n in r["variants"] else "-" for n in library]
            + [
                r["variants"]["textbook"]["ms_per_step"] / r["variants"][n]["ms_per_step"]
                if n in r["variants"]
                else "-"
                for n in library
            ]
            + [r["cpu_share"]]
            for r in rows
        ],
    )
    print_table(
        f"Steps/s, samples/s (chain updates: batch × steps/s) and GFLOP/s with % of the {peak:.0f} GFLOP/s "
        "GEMM peak (useful FLOPs: the library step's, for every variant)",
        [
            "model",
            "batch",
            "GFLOP/step",
            *(f"{n} steps/s" for n in names),
            *(f"{n} samples/s" for n in names),
            *(f"{n} GFLOP/s" for n in names),
        ],
        [
            [r["model"], r["batch"], r["gflop_per_step"]]
            + [r["variants"][n]["steps_per_s"] if n in r["variants"] else "-" for n in names]
            + [r["variants"][n]["samples_per_s"] if n in r["variants"] else "-" for n in names]
            + [
                f"{r['variants'][n]['gflops']:.1f} ({100 * r['variants'][n]['gflops'] / peak:.0f}%)"
                if n in r["variants"]
                else "-"
                for n in names
            ]
            for r in rows
        ],
    )


def bar_verdict(throughput: list[dict[str, Any]], peak: float, peak_cpu: float) -> dict[str, Any] | None:
    """The issue's bar on CNN28 at batch 128, by wall clock (the bar) and by CPU time (load-robust)."""
    row = next((r for r in throughput if r["model"] == "cnn28" and r["batch"] == 128), None)
    if row is None:
        return None
    library = {k: v for k, v in row["variants"].items() if k != "textbook"}
    best_name = min(library, key=lambda k: library[k]["ms_per_step"])
    best = library[best_name]
    textbook_ms = row["variants"]["textbook"]["ms_per_step"]
    speedup = textbook_ms / best["ms_per_step"]
    fraction = best["gflops"] / peak
    best_cpu_name = min(library, key=lambda k: library[k]["cpu_ms_per_step"])
    best_cpu = library[best_cpu_name]
    gflop_per_cpu_s = row["gflop_per_step"] / (best_cpu["cpu_ms_per_step"] / 1e3)  # CPU time sums threads
    return {
        "cpu_variant": best_cpu_name,
        "cpu_speedup": row["variants"]["textbook"]["cpu_ms_per_step"] / best_cpu["cpu_ms_per_step"],
        "gflop_per_cpu_s": gflop_per_cpu_s,
        "cpu_peak_fraction": gflop_per_cpu_s / peak_cpu,
        "variant": best_name,
        "speedup": speedup,
        "gflops": best["gflops"],
        "peak_fraction": fraction,
        "speedup_met": speedup >= BAR_SPEEDUP,
        "peak_met": fraction >= BAR_PEAK_FRACTION,
        # The rate the library's useful FLOPs would need for the speed-up bar against this textbook time.
        "speedup_bar_needs_gflops": BAR_SPEEDUP * row["gflop_per_step"] / (textbook_ms / 1e3),
        "textbook_gflops_with_weight_grads": row["textbook_gflop_per_step"] / (textbook_ms / 1e3),
    }


def plot(path: Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    for model in dict.fromkeys(r["model"] for r in results["throughput"]):
        rows = [r for r in results["throughput"] if r["model"] == model]
        batches = [r["batch"] for r in rows]
        fast = "fast_cl" if "fast_cl" in rows[0]["variants"] else "fast"
        line = ax.plot(
            batches, [r["variants"][fast]["ms_per_step"] for r in rows], "o-", label=f"{model} library"
        )
        ax.plot(
            batches,
            [r["variants"]["textbook"]["ms_per_step"] for r in rows],
            "x--",
            color=line[0].get_color(),
            label=f"{model} textbook",
        )
    batches = sorted({r["batch"] for r in results["throughput"]})
    ax.set_xscale("log")
    ax.set_xticks(batches, [str(b) for b in batches], minor=False)
    ax.set_xticks([], minor=True)
    ax.set(
        yscale="log",
        xlabel="batch (chains)",
        ylabel="ms per Langevin step",
        title="cost vs batch size",
    )
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.16))  # below, clear of lines
    ax = axes[1]
    rows = results["image_size"]
    if rows:
        sizes = [r["image_size"] for r in rows]
        ax.plot(sizes, [r["fast_cl_ms_per_step"] for r in rows], "o-", label="library (channels_last)")
        ax.plot(sizes, [r["textbook_ms_per_step"] for r in rows], "x--", label="textbook")
        scale = rows[0]["fast_cl_ms_per_step"] / rows[0]["gflop_per_step"]
        ax.plot(sizes, [scale * r["gflop_per_step"] for r in rows], ":", color="grey", label="∝ FLOPs")
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(size) for size in sizes], minor=False)
        ax.set_xticks([], minor=True)
        ax.set(yscale="log", title=f"cost vs image size (ResNet32, batch {rows[0]['batch']})")
        ax.legend(fontsize=8)
    ax.set(xlabel="image side (px)", ylabel="ms per Langevin step")
    ax = axes[2]
    rows = results["steps"]
    if rows:
        steps = [r["steps"] for r in rows]
        ax.plot(steps, [r["fast_cl_s"] for r in rows], "o-", label="library (channels_last)")
        ax.plot(steps, [r["textbook_s"] for r in rows], "x--", label="textbook")
        ax.set(title=f"cost vs number of steps (CNN28, batch {rows[0]['batch']})")
        ax.legend(fontsize=8)
    ax.set(xlabel="Langevin steps", ylabel="seconds per sampler run")
    load = results["machine"]["load_average_start"]
    fig.suptitle(
        f"Langevin sampling on {results['machine']['threads']} thread(s); load average at start "
        f"{load[0]:.2f}" + ("  (BUSY: preliminary)" if results["warnings"] else ""),
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, default=None, help="write every table as JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="write the scaling PNG here")
    parser.add_argument("--quick", action="store_true", help="fewer batches, steps and repeats")
    parser.add_argument(
        "--threads",
        type=whole_number(1),
        default=None,
        help="intra-op threads (default: the machine's cores)",
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=whole_number(1), default=None)
    parser.add_argument("--steps", type=whole_number(1), default=None, help="Langevin steps per timed run")
    compile_group = parser.add_mutually_exclusive_group()
    compile_group.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="also time torch.compile (default: on, off with --quick)",
    )
    compile_group.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument(
        "--cold-compile", action="store_true", help="bypass torch.compile's on-disk caches (first-run cost)"
    )
    parser.add_argument("--probe", nargs=3, metavar=("MODEL", "BATCH", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    threads = args.threads or machine_threads()
    torch.set_num_threads(threads)
    if args.cold_compile:
        import torch._inductor.config as inductor_config

        inductor_config.force_disable_caches = True
    if args.probe is not None:  # one cell of the threads table, in a process of its own
        name, batch, steps = args.probe
        print(json.dumps(probe(MODELS[name], int(batch), int(steps), repeats=PROBE_REPEATS)))
        return 0
    quick = args.quick
    batches = args.batches or ([64, 128] if quick else [64, 128, 256, 512])
    n_steps = args.steps or (5 if quick else 10)
    budget_s = 2.0 if quick else 6.0
    max_repeats = 5 if quick else 9
    do_compile = (not quick) if args.compile is None else args.compile
    cases = [MODELS[name] for name in args.models]
    loads = LoadLog(threads)

    omp_env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    # glibc's allocator: the Makefile keeps multi-MB activations in the heap (fewer page faults a step)
    malloc_env = {k: os.environ.get(k) for k in MALLOC_ENV}
    print(
        f"torch {torch.__version__}; {os.cpu_count()} cores, affinity {machine_threads()}, "
        f"{threads} intra-op thread(s); load average at start {loads.start[0]:.2f} {loads.start[1]:.2f} "
        f"{loads.start[2]:.2f}"
    )
    policy_source = "set by hand" if OMP_WAIT_POLICY_SET_BY_USER else "picked by ebm.runtime from the load"
    print(
        "OpenMP: "
        + ", ".join(f"{k}={v if v is not None else '(unset)'}" for k, v in omp_env.items())
        + f" (wait policy {policy_source})"
    )
    print("malloc: " + ", ".join(f"{k}={v if v is not None else '(unset)'}" for k, v in malloc_env.items()))
    for note in loads.warnings():
        print(f"WARNING: {note}; figures are preliminary", file=sys.stderr)
    if loads.warnings() and threads > 1 and (omp_env["OMP_WAIT_POLICY"] or "").upper() != "PASSIVE":
        print(
            f"WARNING: {threads} intra-op threads on a busy machine with OpenMP's default wait policy: "
            "parallel ops wait for descheduled threads (see the threads table); --threads 1 or "
            "OMP_WAIT_POLICY=PASSIVE give steadier figures",
            file=sys.stderr,
        )
    gemm_n = 2048 if quick else 4096
    peak, peak_cpu = gemm_peak_gflops(gemm_n, 3 if quick else 5)
    peak_1t = peak
    if threads > 1:
        with intra_op_threads(1):
            peak_1t, _ = gemm_peak_gflops(gemm_n, 3)
    print(
        f"GEMM peak (fp32 {gemm_n}², best of several): {peak:.0f} GFLOP/s at {threads} thread(s), "
        f"{peak_1t:.0f} at 1"
    )

    results: dict[str, Any] = {
        "machine": {},
        "throughput": [],
        "threads": [],
        "compile": [],
        "image_size": [],
        "steps": [],
        "equivalence": [],
        "warnings": [],
    }

    equivalence = [check_equivalence(case, 16, 10) for case in cases]
    results["equivalence"] = equivalence
    print_table(
        "Same chain for the same pre-drawn noise (textbook vs library, batch 16, 10 steps)",
        ["model", "max |Δx|", "max |x−x0|", "same"],
        [[r["model"], r["max_abs_diff"], r["max_abs_move"], r["same_chain"]] for r in equivalence],
    )
    loads.mark("equivalence")

    for case in cases:
        for batch in batches:
            row = throughput_row(
                case, batch, n_steps, compile=do_compile, budget_s=budget_s, max_repeats=max_repeats
            )
            results["throughput"].append(row)
            textbook = row["variants"]["textbook"]
            print(
                f"  {case.name} batch {batch}: "
                + ", ".join(
                    f"{name} {v['ms_per_step']:.2f} ms ({textbook['ms_per_step'] / v['ms_per_step']:.2f}×)"
                    for name, v in row["variants"].items()
                )
                + f"; cpu share {row['cpu_share']:.2f}",
                flush=True,
            )
        loads.mark(f"throughput {case.name}")
    if threads > 1:
        results["threads"] = threads_rows(cases, 128, n_steps, threads)
        cells = [f"{t}t_{p}" for t in sorted({1, threads}) for p in WAIT_POLICIES]
        print_table(
            "Library ms per step (batch 128, channels_last for conv) by intra-op threads and OpenMP wait "
            f"policy, each in a fresh process (median of {PROBE_REPEATS} runs)",
            ["model", *(c.replace("_", " ") for c in cells)],
            [[r["model"], *(r[c] for c in cells)] for r in results["threads"]],
        )
        loads.mark("threads")

    if do_compile:
        results["compile"] = compile_rows(cases, 128, n_steps, budget_s)
        print_table(
            "torch.compile of the per-step gradient (batch 128; compile s with inductor's on-disk cache "
            + (
                "disabled)"
                if args.cold_compile
                else "as found: warm after an earlier run, --cold-compile for cold)"
            ),
            ["model", "compile s", "eager ms/step", "compiled ms/step", "break-even steps"],
            [
                [
                    r["model"],
                    r["compile_s"],
                    r["eager_ms_per_step"],
                    r["compiled_ms_per_step"],
                    "never" if r["break_even_steps"] is None else f"{r['break_even_steps']:.0f}",
                ]
                for r in results["compile"]
            ],
        )
        loads.mark("compile")

    if "cnn28" in args.models:
        bar_row = next(
            (r for r in results["throughput"] if r["model"] == "cnn28" and r["batch"] == 128), None
        )
        if bar_row is None:
            print(
                "\nAnatomy skipped: it splits the CNN28 batch-128 step of the throughput table "
                "(--batches 128)"
            )
        else:
            bandwidth = memory_bandwidth_gbs()
            # The floor is built from the eager ebm.fastconv kernels on channels_last activations: split
            # that variant's step, not the fastest of all (compiled or autograd steps are other work).
            bar_step_ms = bar_row["variants"]["fast_cl"]["ms_per_step"]
            results["anatomy"] = anatomy(128, 5 if quick else 15, peak, bandwidth, bar_step_ms)
            a = results["anatomy"]
            print_table(
                "Anatomy of one CNN28 step (batch 128): each convolution alone, PyTorch's autograd path "
                "(NCHW) vs the library's (ebm.fastconv); roofline = min(GEMM peak, FLOP/byte × "
                f"{bandwidth:.0f} GB/s copy)",
                [
                    "layer",
                    "MFLOP",
                    "FLOP/B",
                    "roofline GFLOP/s",
                    "fwd ms (autograd, library)",
                    "∂x ms (autograd, library)",
                    "same-shape GEMM fwd, ∂x ms",
                    "library fwd, ∂x GFLOP/s",
                    "∂x route",
                ],
                [
                    [
                        layer["layer"],
                        layer["mflop"],
                        layer["flop_per_byte"],
                        layer["roofline_gflops"],
                        f"{layer['autograd_forward_ms']:.2f}, {layer['library_forward_ms']:.2f}",
                        f"{layer['autograd_input_grad_ms']:.2f}, {layer['library_input_grad_ms']:.2f}",
                        f"{layer['gemm_forward_ms']:.2f}, {layer['gemm_input_grad_ms']:.2f}",
                        f"{layer['library_forward_gflops']:.0f}, {layer['library_input_grad_gflops']:.0f}",
                        layer["library_input_grad_route"],
                    ]
                    for layer in a["layers"]
                ],
            )
            print(
                f"library convolutions {a['conv_ms_per_step']:.2f} ms (their FLOPs as GEMMs of their "
                f"shapes: {a['same_shape_gemm_ms_per_step']:.2f}) of a {a['step_ms']:.2f} ms eager "
                "channels_last step (fast_cl); "
                f"the rest {a['other_ms_per_step']:.2f} ms: SiLU forward and gradient "
                f"{a['activation_ms_per_step']:.2f}, head {a['head_ms_per_step']:.2f}, "
                f"update {a['update_ms_per_step']:.2f} (each timed alone), "
                f"dispatch, Python and the allocator {a['overhead_ms_per_step']:.2f}"
            )
            rounds = 3 if quick else 7
            c = results["ceiling"] = ceiling(128, n_steps, rounds, 5 if quick else 10)
            print_table(
                f"Ceiling (CNN28 batch 128, {rounds} rounds, each timing back to back the textbook step, the "
                "library's, and the floor: every part of the library's step timed alone, summed)",
                ["round", "textbook ms", "library ms", "floor ms", "convolutions ms", "library ×", "floor ×"],
                [
                    [
                        i + 1,
                        r["textbook_ms"],
                        r["library_ms"],
                        r["floor_ms"],
                        r["conv_ms"],
                        r["textbook_ms"] / r["library_ms"],
                        r["textbook_ms"] / r["floor_ms"],
                    ]
                    for i, r in enumerate(c["rounds"])
                ],
            )
            print(
                f"median: the library {c['speedup']:.2f}× the textbook loop; a step with no overhead at "
                f"all (the floor) {c['ceiling']:.2f}×; its convolutions alone "
                f"{c['convolutions_only_ceiling']:.2f}×"
            )

        loads.mark("anatomy")
        results["steps"] = steps_rows([1, 5, 20] if quick else [1, 2, 5, 10, 20, 50], 128, budget_s)
        print_table(
            "Cost vs number of steps (CNN28, batch 128)",
            ["steps", "textbook s", "library s"],
            [[r["steps"], r["textbook_s"], r["fast_cl_s"]] for r in results["steps"]],
        )
    if "resnet32" in args.models:
        results["image_size"] = image_size_rows(
            [16, 32, 64] if quick else [16, 24, 32, 48, 64], 32, n_steps, budget_s
        )
        print_table(
            "Cost vs image size (ResNet32, batch 32)",
            ["px", "GFLOP/step", "textbook ms", "library ms"],
            [
                [r["image_size"], r["gflop_per_step"], r["textbook_ms_per_step"], r["fast_cl_ms_per_step"]]
                for r in results["image_size"]
            ],
        )
    loads.mark("end")

    peak_end, peak_cpu_end = gemm_peak_gflops(gemm_n, 3 if quick else 5)
    peak, peak_cpu = max(peak, peak_end), max(peak_cpu, peak_cpu_end)
    if threads == 1:
        peak_1t = peak
    else:
        with intra_op_threads(1):
            peak_1t = max(peak_1t, gemm_peak_gflops(gemm_n, 3)[0])
    results["machine"] = {
        "torch": torch.__version__,
        "cores": os.cpu_count(),
        "threads": threads,
        "gemm_n": gemm_n,
        "gemm_peak_gflops": peak,
        "gemm_peak_gflops_1_thread": peak_1t,
        "gemm_peak_gflop_per_cpu_s": peak_cpu,
        "openmp_env": omp_env,
        "openmp_wait_policy_set_by_user": OMP_WAIT_POLICY_SET_BY_USER,
        "malloc_env": malloc_env,
        "load_average_start": loads.start,
        "load_average_samples": loads.samples,
    }
    results["warnings"] = loads.warnings()
    results["fastconv_routes"] = fastconv.route_counts()  # fallbacks appear as "ordinary path: <reason>"
    print_throughput(results["throughput"], peak, n_steps)
    verdict = bar_verdict(results["throughput"], peak, peak_cpu)
    results["bar"] = verdict
    if verdict is not None:
        print(
            f"\nBar, CNN28 batch 128 ({verdict['variant']}): {verdict['speedup']:.2f}× the textbook "
            f"(goal ≥ {BAR_SPEEDUP:g}×: {'met' if verdict['speedup_met'] else 'NOT met'}), "
            f"{verdict['gflops']:.1f} GFLOP/s = {100 * verdict['peak_fraction']:.0f}% of the "
            f"{peak:.0f} GFLOP/s GEMM peak (goal ≥ {100 * BAR_PEAK_FRACTION:.0f}%: "
            f"{'met' if verdict['peak_met'] else 'NOT met'})"
        )
        print(
            f"  the textbook loop itself runs its {verdict['textbook_gflops_with_weight_grads']:.1f} GFLOP/s "
            f"(weight gradients included) = {100 * verdict['textbook_gflops_with_weight_grads'] / peak:.0f}% "
            f"of peak; {BAR_SPEEDUP:g}× it needs the library's FLOPs at "
            f"{verdict['speedup_bar_needs_gflops']:.1f} GFLOP/s = "
            f"{100 * verdict['speedup_bar_needs_gflops'] / peak:.0f}% of peak"
        )
        if "ceiling" in results:
            c = results["ceiling"]
            verdict["ceiling"] = c["ceiling"]
            print(
                f"  ceiling, timed beside the textbook loop: a step with no overhead at all would be "
                f"{c['ceiling']:.2f}× it ("
                + (
                    f"{BAR_SPEEDUP:g}× needs kernels faster than these"
                    if c["ceiling"] < BAR_SPEEDUP
                    else f"{BAR_SPEEDUP:g}× is within these kernels' reach: the rest is overhead"
                )
                + ")"
            )
        print(
            f"  by CPU time (the seconds it actually ran; load-robust at 1 thread, inflated by spinning "
            f"threads above): {verdict['cpu_variant']} {verdict['cpu_speedup']:.2f}× the textbook, "
            f"{verdict['gflop_per_cpu_s']:.1f} GFLOP per CPU-second = "
            f"{100 * verdict['cpu_peak_fraction']:.0f}% of the GEMM's {peak_cpu:.0f}"
        )
    fallbacks = fastconv.fallback_counts()
    print(f"ebm.fastconv routes taken: {results['fastconv_routes']}; fallbacks: {fallbacks or 'none'}")
    end = loads.samples[-1][1]
    print(f"load average at end {end[0]:.2f} {end[1]:.2f} {end[2]:.2f}")
    for note in results["warnings"]:
        print(f"WARNING: {note}; figures are preliminary, rerun on a quiet machine", file=sys.stderr)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_report_json(args.json, results)
    if args.plot is not None:
        plot(args.plot, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
