"""A pass over a pickle's opcode stream, before it is unpickled, that bounds what unpickling would build.

The C unpickler trusts the stream: a memo index (`LONG_BINPUT`) in the hundreds of millions makes it
allocate a memo table that large, a few bytes per level nest tuples millions deep (hashing such a tuple
as a dict key recurses in C until the process dies with SIGSEGV), and a stream of one-byte opcodes can
push tens of millions of objects. This pass simulates the unpickler's stack with one small record per
object (its nesting depth) and refuses the stream, by the bound it breaks, before any object exists.
Nothing is resolved or called here: globals are only named (the allow-list is the unpickler's job).
"""
from __future__ import annotations

import pickletools

MAX_OPS = 4_000_000  # opcodes (SD v1 with EMA: about 70,000); also bounds the scan's own time
MAX_DEPTH = 100  # container nesting (real checkpoints: under 10)
MAX_STACK = 1_000_000  # objects on the unpickler's stack at once
MAX_MEMO = 1_000_000  # memo index (one entry per memoised object)

# Opcodes that change the object below their arguments in place (it stays on the stack).
_IN_PLACE = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}


class PickleBomb(ValueError):
    """The stream breaks one of the bounds above."""


def scan(data: bytes) -> int:
    """Check the pickle in `data` against the bounds; returns the number of opcodes. Raises PickleBomb,
    or ValueError for a stream pickletools cannot parse."""
    stack: list = []  # a record per object: [depth]; None for a mark
    marks: list[int] = []  # positions of the marks in `stack`
    memo: dict[int, list] = {}
    n = 0
    for op, arg, _pos in pickletools.genops(data):
        n += 1
        if n > MAX_OPS:
            raise PickleBomb(f"more than {MAX_OPS} opcodes")
        name = op.name
        if name in _PUTS or name == "MEMOIZE":
            index = len(memo) if name == "MEMOIZE" else arg
            if not isinstance(index, int) or not 0 <= index < MAX_MEMO:
                raise PickleBomb(f"memo index {index} (at most {MAX_MEMO - 1})")
            if not stack or stack[-1] is None:
                raise ValueError("memo store with an empty stack")
            memo[index] = stack[-1]
            continue
        if name in _GETS:
            if arg not in memo:
                raise ValueError(f"memo index {arg} read before it was stored")
            stack.append(memo[arg])
            continue
        if name == "MARK":
            marks.append(len(stack))
            stack.append(None)
            continue
        if name in ("STOP", "POP_MARK", "POP", "DUP", "PROTO", "FRAME"):
            if name == "POP_MARK":
                _pop_to_mark(stack, marks)
            elif name == "POP" and stack:
                if stack.pop() is None:
                    marks.pop()
            elif name == "DUP" and stack:
                stack.append(stack[-1])
            continue
        popped = _pop(op, stack, marks)
        deepest = max((r[0] for r in popped), default=0)
        if name in _IN_PLACE:
            if not popped:
                raise ValueError(f"{name} with an empty stack")
            target = popped[0]  # the container stays; what was added to it nests one level below
            rest = max((r[0] for r in popped[1:]), default=0)
            target[0] = max(target[0], rest + 1)
            if target[0] > MAX_DEPTH:
                raise PickleBomb(f"containers nested deeper than {MAX_DEPTH} levels")
            stack.append(target)
            continue
        for after in op.stack_after:
            if after is pickletools.markobject:
                marks.append(len(stack))
                stack.append(None)
            else:
                depth = deepest + 1 if popped else 1
                if depth > MAX_DEPTH:
                    raise PickleBomb(f"containers nested deeper than {MAX_DEPTH} levels")
                stack.append([depth])
        if len(stack) > MAX_STACK:
            raise PickleBomb(f"more than {MAX_STACK} objects on the stack")
    return n


def _pop_to_mark(stack: list, marks: list) -> list:
    if not marks:
        raise ValueError("no mark on the stack")
    at = marks.pop()
    items = stack[at + 1:]
    del stack[at:]
    return items


def _pop(op, stack: list, marks: list) -> list:
    """The records `op` consumes, in stack order (an in-place target first)."""
    taken: list = []
    sliced = False
    for before in reversed(op.stack_before):
        if before is pickletools.stackslice:
            taken[:0] = _pop_to_mark(stack, marks)
            sliced = True
        elif before is pickletools.markobject:
            sliced = False  # the mark went with the slice
        elif sliced:
            continue  # between the mark and the slice (OBJ's class): taken with the slice
        else:
            if not stack or stack[-1] is None:
                raise ValueError(f"{op.name} with too few objects on the stack")
            taken.insert(0, stack.pop())
    return taken
