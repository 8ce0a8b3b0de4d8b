"""A plugin as a user writes one (``resources.plugins: [tests.flows.plugin_olmo]``): it teaches
neuronmap a family it does not ship, OLMo (``model_type: olmo``), where the neuron site is the
input of ``mlp.down_proj`` as in Llama."""

from ops.models import ArchSpec, register_arch

register_arch("olmo", ArchSpec(
    layers=lambda m: m.model.layers,
    down_proj=lambda b: b.mlp.down_proj,
    d_mlp=lambda c: int(c.intermediate_size),
    description="mlp.down_proj input",
    in_proj=lambda b: b.mlp.gate_proj,
    final_norm=lambda m: m.model.norm,
))  # fmt: skip
