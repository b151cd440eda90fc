"""The op registry: the ONE place that knows layer and op kinds (see ``registry.py``).

Teach fxmerge an op with ``register`` and a template (``norm``, ``elementwise``/``preserve``,
``linear``) or a rule function; list what is known with ``rules()``::

    import fxmerge
    fxmerge.ops.register(MyRMSNorm, fxmerge.ops.norm(dims=-1, params=("weight",)))
    [entry.name for entry in fxmerge.ops.rules() if entry.family == "norm"]

Built-in entries live in one module per family: conv_linear, norm, attention, elementwise, shape,
pool_reduce, embedding, torchvision, aten.
"""

# The family modules register the built-ins when imported. Two of them share their name with a
# template function (``norm``, ``elementwise``): the templates are bound last, so
# ``fxmerge.ops.norm`` is the template (the family modules stay in ``sys.modules``).
from fxmerge.ops import conv_linear, elementwise, norm, attention, embedding, pool_reduce, shape, torchvision, aten  # noqa: F401, I001
from fxmerge.ops.registry import (
    OpEntry,
    Rule,
    RunningStats,
    consumes,
    function_entry,
    identity_parameter,
    batch_norm_schema,
    affine_arguments,
    is_eval_identity,
    is_layer,
    is_sum,
    is_user_module,
    lookup,
    method_entry,
    module_entry,
    node_entry,
    normalises,
    register,
    rescale_params,
    resized_shape,
    returns_view,
    rules,
    running_stats,
    unregister,
    update_attributes,
    writes_in_place,
    zeroes_output,
)
from fxmerge.ops.templates import elementwise, linear, norm, preserve  # noqa: F811

FAMILIES = ("conv_linear", "norm", "attention", "elementwise", "shape", "pool_reduce", "embedding", "torchvision", "aten")

__all__ = [
    "FAMILIES",
    "OpEntry",
    "Rule",
    "RunningStats",
    "batch_norm_schema",
    "consumes",
    "elementwise",
    "function_entry",
    "identity_parameter",
    "affine_arguments",
    "is_eval_identity",
    "is_layer",
    "is_sum",
    "is_user_module",
    "linear",
    "lookup",
    "method_entry",
    "module_entry",
    "node_entry",
    "norm",
    "normalises",
    "preserve",
    "register",
    "rescale_params",
    "resized_shape",
    "returns_view",
    "rules",
    "running_stats",
    "unregister",
    "update_attributes",
    "writes_in_place",
    "zeroes_output",
]
