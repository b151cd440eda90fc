"""Output balancing (``output_balance="norm"``): the models' output layers averaged with weights
that undo the scale of each model's outputs.

A shared output is the average of what the models' output layers compute. When one model's
outputs are larger (a deeper ResNet's embeddings have 2-3x the norm of a shallower one's on the
digits pairs), it dominates that average, and under a scale-invariant readout (a cosine head,
argmax over logits of one model) the merge then answers mostly as that model. Weighting model k
by 1 / rms_k (rms_k: the root mean squared norm of its outputs per sample on the calibration
data) averages outputs of equal scale instead, as an ensemble that averages normalised
predictions does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_leaves

from fxmerge.errors import CalibrationError
from fxmerge.inputs import as_batch


def output_layer_params(gm: GraphModule) -> set[str]:
    """The state names of the parameters of the layers that compute ``gm``'s outputs: the nodes
    with parameters (a module's, or ``get_attr`` parameters an op reads) first reached walking back
    from the output through nodes without parameters (flatten, pooling, activations, adds)."""
    modules = dict(gm.named_modules())
    parameters = dict(gm.named_parameters())

    def own(node: Node) -> set[str]:
        if node.op == "call_module":
            return {f"{node.target}.{name}" for name, _ in modules[node.target].named_parameters()}
        return {str(arg.target) for arg in node.all_input_nodes if arg.op == "get_attr" and str(arg.target) in parameters}

    found: set[str] = set()
    seen: set[Node] = set()
    stack = [node for node in gm.graph.nodes if node.op == "output"]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        params = own(node) if node.op in ("call_module", "call_function", "call_method") else set()
        if params:
            found |= params
            continue
        stack.extend(node.all_input_nodes)
    return found


def output_rms(graphs: Sequence[GraphModule], batches: Sequence[Any]) -> list[float]:
    """Per model, sqrt(mean over samples of the squared norm of all its floating outputs)."""
    norms = []
    with torch.no_grad():
        for gm in graphs:
            total, samples = 0.0, 0
            for batch in batches:
                leaves = [t for t in tree_leaves(as_batch(batch).run(gm)) if torch.is_tensor(t) and t.is_floating_point()]
                if not leaves:
                    raise CalibrationError("output_balance='norm': the model returns no floating tensor to measure")
                total += sum(float(t.double().square().sum()) for t in leaves)
                samples += int(leaves[0].shape[0]) if leaves[0].dim() else 1
            norms.append((total / max(samples, 1)) ** 0.5)
    return norms


def balanced_output_weights(rms: Sequence[float], model_weights: Sequence[float] | None) -> tuple[float, ...]:
    """w_k proportional to model_weights[k] (equal when None) / rms_k, summing to 1; a model whose
    outputs are all zero keeps its plain weight (nothing to rescale)."""
    count = len(rms)
    base = [1.0 / count] * count if model_weights is None else list(model_weights)
    raw = [b / r if r > 0 else b for b, r in zip(base, rms)]
    total = sum(raw)
    return tuple(w / total for w in raw) if total > 0 else tuple(base)
