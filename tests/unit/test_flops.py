"""The FLOPs the throughput benchmark divides by its time, checked by hand on a small model."""

from __future__ import annotations

from tp_engine.bench.common import Request
from tp_engine.bench.flops import cpu_peak, workload_flops
from tp_engine.model.config import ModelConfig


def test_workload_flops_by_hand():
    config = ModelConfig.from_dict({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 8, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 16,
        "vocab_size": 10, "max_position_embeddings": 64})
    # one request: 3 prompt tokens, 2 outputs -> 4 tokens fed, at positions 0..3
    per_layer = 8 * (2 + 2) * 4 + 2 * 4 * 8 + 3 * 8 * 16  # qkv, o, gate+up+down
    linear = 2 * 2 * per_layer * 4
    attention = 4 * 2 * 2 * 4 * (1 + 2 + 3 + 4)
    head = 2 * 10 * 8 * 2
    assert workload_flops(config, [Request([1, 2, 3], 2)]) == linear + attention + head


def test_cpu_peak_names_how_it_was_reckoned():
    peak, how = cpu_peak("float32")
    assert (peak > 0 and "cores x" in how) or (peak == 0 and how == "unknown CPU")
