"""`tp-engine bench overhead`: what the control plane costs per decode step, at TP=1.

engine step: B requests of the same prompt, decoded together; the caller times the arrival of
    each token of one of them, and the step is the median interval between two (the first
    steps skipped): medians shrug off the bursts of a shared machine better than means do.
bare forward: the same model in this process, same threads, same batch, same contexts: only
    the model's forward, the LM head and the greedy argmax of each decode step, with every
    input tensor built beforehand; the median step over the same range.
The difference is everything else: scheduling, the Step message, ZeroMQ both ways, the
worker's checks and attention metadata, the stream-back thread, and the waits between them."""

from __future__ import annotations

import argparse
import time

from tp_engine.bench import common

TARGET_MS = 0.3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--steps", default="16,80",
                   help="S,T: steps S..T of T output tokens are timed")
    p.add_argument("--runs", type=int, default=5)


def engine_step(engine, prompts: list[list[int]], t1: int, t2: int, runs: int) -> float:
    from tp_engine import SamplingParams
    from tp_engine.engine.request import SyncSink

    params = SamplingParams(max_tokens=t2, temperature=0, ignore_eos=True)
    steps = []
    for _ in range(runs):
        states = [engine._core.submit(p, params, SyncSink()) for p in prompts]
        arrivals = []
        while True:
            delta = states[0].sink.get()
            if delta.error is not None:
                raise delta.error
            arrivals += [time.perf_counter()] * len(delta.token_ids)
            if delta.finish_reason is not None:
                break
        for state in states[1:]:  # the others finish with the same step
            while state.sink.get().finish_reason is None:
                pass
        steps += [b - a for a, b in zip(arrivals[t1:t2 - 1], arrivals[t1 + 1:t2])]
    return common.median(steps)


class Bare:
    """The model alone in this process, with the worker's threads and allocator policy."""

    def __init__(self, path: str, block_size: int):
        import torch

        from tp_engine.model.loader import load_model
        from tp_engine.model.parallel import TensorParallel
        from tp_engine.worker.model_runner import keep_freed_memory

        keep_freed_memory()
        torch.set_num_threads(common.worker_threads(1))
        self.model = load_model(path, TensorParallel(), torch.float32, torch.device("cpu"))
        self.block_size = block_size

    def steps(self, prompts: list[list[int]], t1: int, t2: int) -> tuple[list[float], list[float]]:
        """Seconds of each timed decode step: (forward + LM head + argmax, metadata build)."""
        import torch

        from tp_engine.model.attention import AttentionMetadata
        from tp_engine.worker.model_runner import zeros_in_huge_pages

        model, bs = self.model, self.block_size
        attn = model.model.layers[0].self_attn
        batch, per_seq = len(prompts), -(-(len(prompts[0]) + t2 + 1) // bs)
        shape = (2, attn.num_kv_heads, batch * per_seq * bs, attn.head_dim)
        caches = [zeros_in_huge_pages(shape, torch.float32, torch.device("cpu"))
                  for _ in model.model.layers]
        tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
        tokens = [list(p) for p in prompts]
        starts, lens = [0] * batch, [len(p) for p in prompts]
        forward, meta_build = [], []
        with torch.inference_mode():
            for step in range(t2 + 1):
                begin = time.perf_counter()
                meta = AttentionMetadata.build(starts, lens, tables, bs,
                                               model.config.sliding_window)
                built = time.perf_counter()
                ids = torch.tensor([t for seq, s in zip(tokens, starts) for t in seq[s:]])
                rows = torch.tensor(lens).cumsum(0) - 1
                start = time.perf_counter()
                hidden = model(ids, meta.positions, caches, meta)
                new = model.compute_logits(hidden if step else hidden[rows]).argmax(-1).tolist()
                if t1 < step < t2:  # the decode steps timed on the engine's side
                    forward.append(time.perf_counter() - start)
                    meta_build.append(built - begin)
                starts = [s + n for s, n in zip(starts, lens)]
                lens = [1] * batch
                for seq, token in zip(tokens, new):
                    seq.append(token)
        return forward, meta_build


def run(args: argparse.Namespace, engine_kwargs: dict) -> int:
    from tp_engine import Engine

    t1, t2 = (int(x) for x in args.steps.split(","))
    kwargs = {**engine_kwargs, "tensor_parallel_size": 1}  # the bare forward is one process
    rows = []
    with Engine(**kwargs) as engine:
        vocab = engine._core.model_config.vocab_size
        bare = Bare(engine.config.model, engine.config.block_size)
        for batch in (int(x) for x in args.batch_sizes.split(",")):
            prompts = [r.prompt_ids for r in common.workload(
                batch, (args.prompt_len, args.prompt_len), (1, 1), vocab, args.workload_seed)]
            engine_step(engine, prompts, 1, 4, 1)  # warm-up
            engine_steps, bare_steps, meta_steps = [], [], []
            for _ in range(args.runs):  # alternated, so a burst of load hits both sides
                engine_steps.append(engine_step(engine, prompts, t1, t2, 1))
                forward, meta = bare.steps(prompts, t1, t2)
                bare_steps += forward
                meta_steps += meta
            step, forward = common.median(engine_steps), common.median(bare_steps)
            overhead = common.ms(step - forward)
            rows.append([batch, common.ms(step), common.ms(forward), f"{overhead:.3f}",
                         f"{common.ms(common.median(meta_steps)):.3f}", f"< {TARGET_MS}",
                         common.verdict(overhead, TARGET_MS)])
    common.print_machine(common.machine({"engine worker threads": str(common.worker_threads(1)),
                                         "model": kwargs["model"]}))
    common.print_table(
        f"control-plane cost per decode step, TP=1: prompts of {args.prompt_len} tokens, "
        f"median over steps {t1}..{t2} of {args.runs} alternated runs (ms)",
        ["batch", "engine step", "bare forward", "control plane", "of which metadata",
         "target", "verdict"], rows)
    return 0
