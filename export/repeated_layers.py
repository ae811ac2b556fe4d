"""Repeated decoder layers traced once: trace the first two layers, copy the second layer's nodes for the rest.

torch.export costs about a second a layer whatever the layer's size (symbolic shapes for every op, twice: the capture
and the decomposition), so a 30-layer model spends most of its export in tracing. When every layer is the same
module with its own weights, the traced graph of layer 2..N-1 is layer 1's nodes again, reading layer i's weights
and cache and the previous copy's outputs. So: trace a two-layer cut of the model, check that its two layers
traced to the same nodes, and copy layer 1's nodes N-2 times in the ONNX graph:

    traced (2 layers):   embed ─▶ [layer 0] ─▶ [layer 1] ─▶ norm ─▶ lm_head
                                       ▲ past.0      ▲ past.1
    stitched (N layers): embed ─▶ [layer 0] ─▶ [layer 1] ─▶ [copy 2] ─▶ ... ─▶ [copy N-1] ─▶ norm ─▶ lm_head
                                                             ▲ past.2            ▲ past.N-1
                                                             model.layers.2.*    model.layers.N-1.*

Nothing is assumed that is not checked. The plan (`repeat_plan`) needs layers of one class with the same structure
(attributes but the layer index, parameter shapes) and no per-layer setting in the config that differs between
layers. The stitch (`stitch_layers`) needs layers 0 and 1 traced to the same ops, attributes and constants, wired the
same way, and layer 1 read by nothing but itself, the final nodes and its present outputs. Either check answers
with a reason, and the export then traces every layer as before. Validation against PyTorch runs on the stitched
graphs like on any other.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import re
from typing import Any, Iterator

import numpy as np
import onnx_ir as ir
import torch

from kvgraph.graphs import GraphContract
from kvgraph.graphs.contract import KV_KINDS
from kvgraph.export.config import text_config

TRACED = 2  # layers traced: layer 0 and the template, layer 1
SCOPES = "pkg.torch.onnx.name_scopes"  # torch.onnx's node metadata: the module path of each node
UNBACKED = re.compile(r"\bu\d+\b")  # torch.export's name for a size that depends on values
INDEX_NAMES = ("layer_idx", "layer_id", "layer_index", "layer_number", "idx")  # a layer's own index: allowed to differ


@dataclasses.dataclass(frozen=True)
class RepeatPlan:
    """What to cut while tracing and how to stitch afterwards."""

    path: str  # the layers' ModuleList inside the Hugging Face model, e.g. "model.layers"
    count: int  # N, the model's layers
    config_lists: tuple[str, ...]  # per-layer config settings (all equal) cut to TRACED entries while tracing

    def scope(self, layer: int) -> str:
        """The layer's module path as the traced graph names it (the step wrapper holds the model as `model`)."""
        return f"model.{self.path}.{layer}"


def repeat_plan(model: torch.nn.Module, contract: GraphContract) -> tuple[RepeatPlan | None, str | None]:
    """(plan, None) when the model's layers can be traced once; (None, reason) when not."""
    if contract.kind != "decoder":
        return None, "encoder-decoders trace every layer"
    if contract.num_layers < TRACED + 2:
        return None, f"{contract.num_layers} layers: too few to gain"
    found = _layer_list(model, contract.num_layers)
    if isinstance(found, str):
        return None, found
    path, layers = found
    reason = _same_structure(layers) or _same_windows(contract)
    if reason:
        return None, reason
    lists = _config_lists(text_config(model.config), contract.num_layers)
    if isinstance(lists, str):
        return None, lists
    return RepeatPlan(path, contract.num_layers, lists), None


def _layer_list(model: torch.nn.Module, count: int) -> tuple[str, torch.nn.ModuleList] | str:
    candidates = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, torch.nn.ModuleList) and len(module) == count and any(True for _ in module.parameters())]
    if len(candidates) != 1:
        return f"{len(candidates)} module lists of {count} layers with weights, not one"
    return candidates[0]


def _same_structure(layers: torch.nn.ModuleList) -> str | None:
    if len({id(layer) for layer in layers}) != len(layers):
        return "a layer module is used twice"
    pointers = [p.data_ptr() for layer in layers for p in layer.parameters()]
    if len(set(pointers)) != len(pointers):
        return "layers share weights"
    first = _signature(layers[0])
    for index, layer in enumerate(layers):
        if _signature(layer) != first:
            return f"layer {index} differs from layer 0 in its modules or settings"
    return None


def _signature(module: torch.nn.Module) -> tuple:
    """Classes, parameter and buffer shapes, and plain settings of the module and its children, but the layer index."""
    parts = []
    for name, child in module.named_modules():
        settings = tuple(sorted((key, repr(value)) for key, value in vars(child).items()
                                if not key.startswith("_") and key not in INDEX_NAMES and not isinstance(value, (torch.nn.Module, torch.Tensor))))
        tensors = tuple((key, tuple(t.shape), t.dtype) for key, t in [*child.named_parameters(recurse=False), *child.named_buffers(recurse=False)]
                        if t is not None)
        parts.append((name, type(child).__qualname__, settings, tensors))
    return tuple(parts)


def _same_windows(contract: GraphContract) -> str | None:
    windows = contract.ring_windows
    return "layers have different ring buffers" if windows and len(set(windows)) > 1 else None


def _config_lists(config, count: int) -> tuple[str, ...] | str:
    """The config's per-layer settings (lists of N entries): each must give every layer the same value."""
    names = []
    for name, value in vars(config).items():
        if isinstance(value, (list, tuple)) and len(value) == count:
            if any(entry != value[0] for entry in value):
                return f"config.{name} differs between layers"
            names.append(name)
    return tuple(names)


@contextlib.contextmanager
def cut_to_traced(model: torch.nn.Module, plan: RepeatPlan) -> Iterator[None]:
    """The model with its first TRACED layers only (and its config saying so), restored on exit."""
    parent_path, _, attribute = plan.path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    layers = getattr(parent, attribute)
    config = text_config(model.config)
    saved = {name: getattr(config, name) for name in plan.config_lists}
    count = config.num_hidden_layers
    setattr(parent, attribute, torch.nn.ModuleList(list(layers)[:TRACED]))
    config.num_hidden_layers = TRACED
    for name, value in saved.items():
        setattr(config, name, type(value)(value[:TRACED]))
    try:
        yield
    finally:
        setattr(parent, attribute, layers)
        config.num_hidden_layers = count
        for name, value in saved.items():
            setattr(config, name, value)


def traced_contract(contract: GraphContract) -> GraphContract:
    """The contract of the cut model."""
    windows = contract.ring_windows[:TRACED] if contract.ring_windows else None
    return dataclasses.replace(contract, num_layers=TRACED, ring_windows=windows)


def stitch_layers(model: ir.Model, plan: RepeatPlan, contract: GraphContract, tensors: dict[str, torch.Tensor]) -> str | None:
    """Copy the template layer's nodes for layers TRACED..N-1 in the traced graph; None when done, else why not (the
    graph is then untouched). `contract` is the full model's; `tensors` the full model's parameters and buffers by
    the names the traced graph gives them."""
    graph = model.graph
    _drop_identities(graph)
    found = _layers(graph, plan)
    if isinstance(found, str):
        return found
    first, template = found
    reason = _same_nodes(first, template, graph, plan, contract) or _wiring(first, template, contract)
    if reason:
        return reason
    _add_copies(graph, template, first, plan, contract, tensors)
    return None


def _drop_identities(graph: ir.Graph) -> None:
    """Identity nodes (the cache's pass-through of each past input) read by other nodes only: their readers read the source."""
    outputs = set(graph.outputs)
    for node in [n for n in graph if n.op_type == "Identity" and n.domain == "" and n.outputs[0] not in outputs]:
        node.outputs[0].replace_all_uses_with(node.inputs[0])
        graph.remove(node, safe=True)


def _layers(graph: ir.Graph, plan: RepeatPlan) -> tuple[list[ir.Node], list[ir.Node]] | str:
    scopes = [plan.scope(layer) for layer in range(TRACED)]
    found: list[list[ir.Node]] = [[] for _ in scopes]
    for node in graph:
        if node.op_type == "Constant" and not node.inputs:
            continue  # the exporter makes a constant once and every later layer reads it: shared, not a layer's own
        text = node.metadata_props.get(SCOPES)
        if text is None:
            return f"a node without {SCOPES} metadata"
        names = ast.literal_eval(text)
        for layer, scope in enumerate(scopes):
            if scope in names:
                found[layer].append(node)
    if not all(found):
        return f"no nodes found under {scopes[0]} or {scopes[1]}"
    return found[0], found[1]


@dataclasses.dataclass(frozen=True)
class _Read:
    """What one node input reads, as one layer sees it."""

    kind: str  # "none", "own" (a value the layer makes), "cache", "weight", "previous" (made by the layer before), "shared"
    key: Any


def _reading(value: ir.Value | None, layer: int, own: dict[ir.Value, tuple[int, int]], before: dict[ir.Value, tuple[int, int]],
             plan: RepeatPlan, contract: GraphContract) -> _Read:
    if value is None:
        return _Read("none", None)
    if value in own:
        return _Read("own", own[value])
    if value in before:
        return _Read("previous", before[value])
    for kind in KV_KINDS:
        if value.name == contract.past_name(layer, kind) and value.is_graph_input():
            return _Read("cache", kind)
    prefix = plan.scope(layer) + "."
    if value.is_initializer() and value.name.startswith(prefix):
        return _Read("weight", value.name[len(prefix):])
    return _Read("shared", value)


def _produced(nodes: list[ir.Node]) -> dict[ir.Value, tuple[int, int]]:
    return {output: (index, k) for index, node in enumerate(nodes) for k, output in enumerate(node.outputs)}


def _same_nodes(first: list[ir.Node], template: list[ir.Node], graph: ir.Graph, plan: RepeatPlan, contract: GraphContract) -> str | None:
    """Layer 0 and layer 1 traced to the same ops, attributes and wiring (layer 1 reading layer 0 where layer 0 reads
    what came before it)."""
    if len(first) != len(template):
        return f"layers 0 and 1 traced to {len(first)} and {len(template)} nodes"
    own0, own1 = _produced(first), _produced(template)
    for a, b in zip(first, template):
        if (a.op_type, a.domain, len(a.inputs), len(a.outputs)) != (b.op_type, b.domain, len(b.inputs), len(b.outputs)):
            return f"layers 0 and 1 differ at {a.op_type} / {b.op_type}"
        if not _same_attributes(a, b):
            return f"layers 0 and 1 differ in the attributes of a {a.op_type} node"
        for x, y in zip(a.inputs, b.inputs):
            reason = _same_read(_reading(x, 0, own0, {}, plan, contract), _reading(y, 1, own1, own0, plan, contract))
            if reason:
                return f"{a.op_type} node: {reason}"
    return None


def _same_read(a: _Read, b: _Read) -> str | None:
    if b.kind == "previous":  # layer 1 reads layer 0's output where layer 0 reads what came before it
        return None if a.kind == "shared" else f"reads layer 0 in layer 1 where layer 0 reads a {a.kind} value"
    if a.kind != b.kind:
        return f"reads a {a.kind} value in layer 0 and a {b.kind} value in layer 1"
    if a.kind == "shared" and a.key is not b.key and not _same_constant(a.key, b.key):
        return f"reads {a.key.name} in layer 0 and {b.key.name} in layer 1"
    return None if a.kind == "shared" or a.key == b.key else f"reads {a.key} in layer 0 and {b.key} in layer 1"


def _same_constant(a: ir.Value, b: ir.Value) -> bool:
    """Two Constant nodes' outputs with equal attributes, or two small initializers with equal values."""
    x, y = a.producer(), b.producer()
    if x is not None and y is not None:
        return x.op_type == y.op_type == "Constant" and not x.inputs and not y.inputs and _same_attributes(x, y)
    return _same_tensor(a.const_value, b.const_value)


def _same_tensor(a, b) -> bool:
    if a is None or b is None or a.nbytes > 1 << 16 or b.nbytes > 1 << 16:
        return False
    x, y = a.numpy(), b.numpy()
    return x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


def _same_attributes(a: ir.Node, b: ir.Node) -> bool:
    if a.attributes.keys() != b.attributes.keys():
        return False
    for name, attribute in a.attributes.items():
        other = b.attributes[name]
        if attribute.type != other.type or attribute.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            return False
        if attribute.type == ir.AttributeType.TENSOR:
            if not _same_tensor(attribute.value, other.value):
                return False
        elif attribute.value != other.value:
            return False
    return True


def _wiring(first: list[ir.Node], template: list[ir.Node], contract: GraphContract) -> str | None:
    """Layer 0 is read by itself and layer 1 only; each layer makes its own present outputs and no other graph output."""
    inside = set(first) | set(template)
    for layer, nodes in enumerate((first, template)):
        made = [output for node in nodes for output in node.outputs]
        outputs = {output.name for output in made if output.is_graph_output()}
        if outputs != {contract.present_name(layer, kind) for kind in KV_KINDS}:
            return f"layer {layer} makes the graph outputs {sorted(outputs)}"
    for node in first:
        if any(use.node not in inside for output in node.outputs for use in output.uses()):
            return "a value of layer 0 is read after layer 1"
    return None


def _add_copies(graph: ir.Graph, template: list[ir.Node], first: list[ir.Node], plan: RepeatPlan, contract: GraphContract,
                tensors: dict[str, torch.Tensor]) -> None:
    own, before = _produced(template), _produced(first)
    previous = [list(node.outputs) for node in template]  # the layer before the copy: its outputs by (node, k)
    inputs = {value.name: value for value in graph.inputs}
    new_inputs: list[ir.Value] = []
    copies: list[ir.Node] = []
    for layer in range(TRACED, plan.count):
        made: list[list[ir.Value]] = []
        for node in template:
            feeds = [_feed(value, layer, own, before, made, previous, plan, contract, graph, inputs, new_inputs, tensors) for value in node.inputs]
            outputs = [ir.Value(name=_copy_name(output.name, layer, contract), type=output.type, shape=_copied_shape(output.shape, layer))
                       for output in node.outputs]
            copies.append(ir.Node(node.domain, node.op_type, feeds, [_copied(a) for a in node.attributes.values()], overload=node.overload,
                                  outputs=outputs, version=node.version, name=f"{node.name}.layer{layer}",
                                  metadata_props=dict(node.metadata_props)))
            made.append(outputs)
        previous = made
    _reroute_after(template, previous, set(copies) | set(template), graph)
    graph.insert_after(template[-1], copies)
    _order_io(graph, new_inputs, contract)
    graph.sort()


def _feed(value: ir.Value | None, layer: int, own, before, made, previous, plan: RepeatPlan, contract: GraphContract, graph: ir.Graph,
          inputs: dict[str, ir.Value], new_inputs: list[ir.Value], tensors: dict[str, torch.Tensor]) -> ir.Value | None:
    read = _reading(value, TRACED - 1, own, before, plan, contract)
    if read.kind == "own":
        index, k = read.key
        return made[index][k]
    if read.kind == "previous":
        index, k = read.key
        return previous[index][k]
    if read.kind == "cache":
        name = contract.past_name(layer, read.key)
        if name not in inputs:
            inputs[name] = ir.Value(name=name, type=value.type, shape=value.shape)
            new_inputs.append(inputs[name])
        return inputs[name]
    if read.kind == "weight":
        return _weight(graph, f"{plan.scope(layer)}.{read.key}", value, tensors)
    return value  # "none", or shared with every layer


def _weight(graph: ir.Graph, name: str, template: ir.Value, tensors: dict[str, torch.Tensor]) -> ir.Value:
    if name in graph.initializers:
        return graph.initializers[name]
    tensor = tensors[name]
    const = type(template.const_value)(tensor.detach(), name=name)  # the class the exporter wraps its weights in: no copy
    value = ir.Value(name=name, type=template.type, shape=template.shape, const_value=const)
    graph.register_initializer(value)
    return value


def _copy_name(name: str, layer: int, contract: GraphContract) -> str:
    for kind in KV_KINDS:
        if name == contract.present_name(TRACED - 1, kind):
            return contract.present_name(layer, kind)
    return f"{name}.layer{layer}"


def _copied_shape(shape: ir.Shape | None, layer: int) -> ir.Shape | None:
    """The template's shape, its data-dependent sizes made the copy's own: torch.export names a size that depends on
    values (tokens routed to an expert) u0, u1, ...; the same name in two layers would claim the sizes are equal."""
    if shape is None:
        return None
    return ir.Shape([dim if isinstance(dim, int) or dim.value is None else UNBACKED.sub(rf"\g<0>_layer{layer}", dim.value) for dim in shape])


def _copied(attribute: ir.Attr) -> ir.Attr:
    return ir.Attr(attribute.name, attribute.type, attribute.value, doc_string=attribute.doc_string)


def _reroute_after(template: list[ir.Node], last: list[list[ir.Value]], layer_nodes: set[ir.Node], graph: ir.Graph) -> None:
    """The nodes after the layers read the last copy's outputs instead of layer 1's."""
    for index, node in enumerate(template):
        for k, output in enumerate(node.outputs):
            for use in list(output.uses()):
                if use.node not in layer_nodes:
                    use.node.replace_input_with(use.idx, last[index][k])


def _order_io(graph: ir.Graph, new_inputs: list[ir.Value], contract: GraphContract) -> None:
    """Inputs and outputs in the contract's order: the past inputs of the copies after the traced ones, every present."""
    cache_inputs = [value for value in [*graph.inputs, *new_inputs] if value.name.startswith("past.")]
    others = [value for value in graph.inputs if not value.name.startswith("past.")]
    graph.inputs.clear()
    graph.inputs.extend([*others, *sorted(cache_inputs, key=lambda v: contract.past_names().index(v.name))])
    produced = {output.name: output for node in graph for output in node.outputs}
    outputs = [value for value in graph.outputs if not value.name.startswith("present.")]
    graph.outputs.clear()
    graph.outputs.extend([*outputs, *(produced[name] for name in contract.present_names())])
