"""Recurrent state outputs: which model outputs are a state the caller feeds back as an input.

A streaming model (silero-vad: ``h, c -> hn, cn``, or one ``state -> stateN``) returns the LSTM/GRU
state for the next call. Compared with the reference as a tensor of its own, such an output is
dominated by directions the model forgets: silero-vad's float model with 60 dB SNR noise on its
audio keeps its speech probabilities at 51 dB but moves ``hn`` to 13.5 dB. What a state must do is
carry the next call correctly, so :func:`edgeq.validate.compare.compare` judges it by the outputs of
a second call that starts from the state each model returned (see there).

A pair is found from the graph, not from names or shapes (an autoencoder's output has its input's
shape and is no state): the output is a recurrent node's final hidden or cell state (``Y_h`` /
``Y_c``) moved only by layout ops (Squeeze, Concat, Transpose, ... and an Add), and the input
reaches the same node's ``initial_h`` / ``initial_c`` through layout ops. ``If`` branches are
followed both ways.
"""

from __future__ import annotations

import onnx

# output index -> input index of the state it continues, per recurrent op
_STATE_SLOTS = {"LSTM": {1: 5, 2: 6}, "GRU": {1: 5}, "RNN": {1: 5}}
_LAYOUT = {"Identity", "Squeeze", "Unsqueeze", "Reshape", "Transpose", "Concat", "Split", "Slice", "Gather",
           "Cast", "Flatten", "Expand"}
_MAX_STEPS = 64


def _graphs(graph: onnx.GraphProto):
    yield graph
    for n in graph.node:
        for a in n.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _graphs(g)


def recurrent_state_pairs(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """``(input, output)`` name pairs of the graph: ``output`` is a state that ``input`` takes back."""
    producer: dict[str, tuple[onnx.NodeProto, int]] = {}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    branch_out: dict[str, list[tuple[onnx.NodeProto, int]]] = {}  # a branch's output -> (If, index)
    for g in _graphs(model.graph):
        for n in g.node:
            for k, o in enumerate(n.output):
                producer[o] = (n, k)
            for k, i in enumerate(n.input):
                consumers.setdefault(i, []).append((n, k))
            if n.op_type == "If":
                for a in n.attribute:
                    for k, o in enumerate(a.g.output):
                        branch_out.setdefault(o.name, []).append((n, k))
    if not any(n.op_type in _STATE_SLOTS for g in _graphs(model.graph) for n in g.node):
        return []

    def sources(name: str) -> set[tuple[int, int]]:
        """(id of a recurrent node, its input slot) whose final state ``name`` is, through layout ops."""
        found, todo, seen = set(), [name], set()
        while todo and len(seen) < _MAX_STEPS:
            v = todo.pop()
            if v in seen or v not in producer:
                continue
            seen.add(v)
            node, k = producer[v]
            if node.op_type in _STATE_SLOTS:
                if k in _STATE_SLOTS[node.op_type]:
                    found.add((id(node), _STATE_SLOTS[node.op_type][k]))
            elif node.op_type == "If":
                todo += [a.g.output[k].name for a in node.attribute if len(a.g.output) > k]
            elif node.op_type in _LAYOUT or node.op_type == "Add":
                todo += [i for i in node.input if i]
        return found

    def sinks(name: str) -> set[tuple[int, int]]:
        """(id of a recurrent node, input slot) that ``name`` becomes the initial state of, through layout ops."""
        found, todo, seen = set(), [name], set()
        while todo and len(seen) < _MAX_STEPS:
            v = todo.pop()
            if v in seen:
                continue
            seen.add(v)
            todo += [If.output[k] for If, k in branch_out.get(v, [])]
            for node, k in consumers.get(v, []):
                if node.op_type in _STATE_SLOTS:
                    if k in _STATE_SLOTS[node.op_type].values():
                        found.add((id(node), k))
                elif node.op_type in _LAYOUT and k == 0:
                    todo += [o for o in node.output if o]
        return found

    inits = {t.name for t in model.graph.initializer}
    ins = {i.name: sinks(i.name) for i in model.graph.input if i.name not in inits}
    pairs = []
    for out in model.graph.output:
        src = sources(out.name)
        pairs += [(name, out.name) for name, dst in ins.items() if src & dst]
    return pairs
