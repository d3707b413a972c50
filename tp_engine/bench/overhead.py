"""`tp-engine bench overhead`: what the control plane costs per decode step, at TP=1.

engine step: B requests of the same prompt, decoded together; the caller notes when each batch
    of tokens of one of them arrives, and the step is the time from the first batch that ends
    at or after output token S to the first that ends at or after T, divided by the tokens in
    between (tokens arrive in batches when the workers run several decode steps per message,
    so single intervals would say nothing).
model, in the engine: over the same steps, the time rank 0 spent in the model (forward, LM
    head, sampling), as the workers report it with each step.
control plane: engine step minus model: everything else, measured in the same steps:
    scheduling, the messages, ZeroMQ both ways, the worker's checks and attention metadata,
    the stream-back thread, the waits between them.
bare forward: the same model in this process, same threads, same batch, same contexts: the
    forward, the LM head and the greedy argmax of each step, every input built beforehand.
engine - bare: the control-plane cost as the target defines it (the verdict): runs alternate
    with the engine's (the bare first in every other pair), and this is the median of the
    differences of each pair, with a 90% bootstrap interval. It also counts what the
    engine's presence costs the forward itself, but on a shared machine whose speed drifts
    by a third within seconds it is the noisier of the two measures (the interval says how
    much)."""

from __future__ import annotations

import argparse
import time

from tp_engine.bench import common

TARGET_MS = 0.3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--steps", default="16,80",
                   help="S,T: the decode steps of output tokens S..T are timed")
    p.add_argument("--runs", type=int, default=15)


def engine_step(engine, prompts: list[list[int]], t1: int,
                t2: int) -> tuple[float, float, int, int]:
    """One run: seconds per decode step and seconds in the model per step, from the first
    batch of tokens that ends at or after output token t1 to the first that ends at or after
    t2 (and after the first); and the indices of those two tokens."""
    from tp_engine import SamplingParams

    loop = engine.core.replicas[0].loop  # the bare forward's group: one
    run = engine.config.decode_steps  # a batch ends at least every `run` tokens
    params = SamplingParams(max_tokens=max(t2, t1 + run) + run, temperature=0, ignore_eos=True)
    states = [samples[0] for samples in  # as generate()
              engine.core.submit_many([(p, params, None) for p in prompts])]
    arrivals = []  # (index of a batch's last token, arrival time, steps run, model seconds)
    received = 0
    while True:
        delta = states[0].get()
        if delta.error is not None:
            raise delta.error
        received += len(delta.token_ids)
        arrivals.append((received - 1, time.perf_counter(), loop.steps, loop.model_seconds))
        if delta.finish_reason is not None:
            break
    for state in states[1:]:  # the others finish with the same step
        state.result()
    first = next(a for a in arrivals if a[0] >= t1)
    last = next(a for a in arrivals if a[0] >= max(t2, first[0] + 1))
    steps = last[2] - first[2]
    return ((last[1] - first[1]) / (last[0] - first[0]), (last[3] - first[3]) / steps,
            first[0], last[0])


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

    def steps(self, prompts: list[list[int]], t1: int, t2: int) -> list[float]:
        """Seconds of the forward, LM head and argmax of each decode step t1..t2."""
        import torch

        from tp_engine.model.attention import AttentionMetadata
        from tp_engine.sampling.sampler import argmax
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
        forward = []
        with torch.inference_mode():
            for step in range(t2 + 1):
                meta = AttentionMetadata.build(starts, lens, tables, bs,
                                               model.config.sliding_window)
                ids = torch.tensor([t for seq, s in zip(tokens, starts) for t in seq[s:]])
                rows = torch.tensor(lens).cumsum(0) - 1
                for group in meta.decode:  # the masks too, which layer 0 would build
                    group.bias_for(attn.num_kv_heads, torch.float32,
                                   group.tables.shape[1] * bs)
                start = time.perf_counter()
                hidden = model(ids, meta.positions, caches, meta)
                new = argmax(model.compute_logits(hidden if step else hidden[rows])).tolist()
                if t1 <= step < t2:  # the decode steps timed on the engine's side
                    forward.append(time.perf_counter() - start)
                starts = [s + n for s, n in zip(starts, lens)]
                lens = [1] * batch
                for seq, token in zip(tokens, new):
                    seq.append(token)
        return forward


def run(args: argparse.Namespace, engine_kwargs: dict) -> int:
    from tp_engine import Engine

    t1, t2 = (int(x) for x in args.steps.split(","))
    kwargs = {**engine_kwargs, "tensor_parallel_size": 1}  # the bare forward is one process
    rows = []
    with Engine(**kwargs) as engine:
        vocab = engine.core.model_config.vocab_size
        bare = Bare(engine.config.model, engine.config.block_size)
        for batch in (int(x) for x in args.batch_sizes.split(",")):
            prompts = [r.prompt_ids for r in common.workload(
                batch, (args.prompt_len, args.prompt_len), (1, 1), vocab, args.workload_seed)]
            engine_step(engine, prompts, 1, 24)  # warm-up
            # the bare times the same decode steps: those that sampled tokens first+1..last
            window = tuple(x + 1 for x in engine_step(engine, prompts, t1, t2)[2:])
            engine_steps, model, bare_steps, differences = [], [], [], []
            for i in range(args.runs):
                # alternated, so a burst of load hits both sides; every other pair the bare
                # goes first, so a steady drift in the machine's speed favours neither
                forward = bare.steps(prompts, *window) if i % 2 else None
                step, in_model, first, last = engine_step(engine, prompts, t1, t2)
                if forward is None or window != (first + 1, last + 1):
                    window = (first + 1, last + 1)
                    forward = bare.steps(prompts, *window)
                engine_steps.append(step)
                model.append(in_model)
                bare_steps.append(sum(forward) / len(forward))
                differences.append(engine_steps[-1] - bare_steps[-1])
            ms = [common.ms(common.median(x)) for x in (engine_steps, model, bare_steps)]
            control = common.ms(common.median([e - m for e, m in zip(engine_steps, model)]))
            cost = common.ms(common.median(differences))
            low, high = (common.ms(x) for x in common.median_interval(differences))
            rows.append([batch, ms[0], ms[1], f"{control:.3f}", ms[2], f"{cost:.3f}",
                         f"{low:.3f} to {high:.3f}", f"< {TARGET_MS}",
                         common.verdict(cost, TARGET_MS)])
    common.print_machine(common.machine({"engine worker threads": str(common.worker_threads(1)),
                                         "model": kwargs["model"]}))
    common.print_table(
        f"control-plane cost per decode step, TP=1: prompts of {args.prompt_len} tokens, "
        f"output tokens {t1}..{t2}, medians of {args.runs} runs (ms); the verdict is on "
        f"engine - bare",
        ["batch", "engine step", "model, in the engine", "control plane", "bare forward",
         "engine - bare", "its 90% interval", "target", "verdict"], rows)
    return 0
