"""Plain values across the sandbox boundary, with their exact types.

JSON alone turns tuples into lists and cannot tell an ``int`` from a subclass of ``int`` whose
``__eq__`` always returns True. Here scalars travel as JSON scalars only when their type is
exactly ``None``, ``bool``, ``int``, ``float`` or ``str``; lists, tuples, sets, dicts and bytes
travel as tagged arrays; anything else (a subclass, a generator, a custom object) travels as an
``opaque`` tag that decodes to a value the judge never accepts: every comparison, truth test or
hash of it raises.

This file uses builtins only and imports nothing: its source is also sent into the sandbox,
where the harness uses ``encode`` for results and ``decode`` for arguments.
"""


class Opaque:
    """A value the sandbox could not send as plain data; the judge never accepts it."""

    __slots__ = ("type_name",)

    def __init__(self, type_name):
        self.type_name = type_name

    def _refuse(self, *args):
        raise TypeError("a " + str(self.type_name) + " returned from the sandbox is not plain data")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __bool__ = __hash__ = __len__ = __iter__ = _refuse
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __float__ = __int__ = __index__ = _refuse
    __contains__ = __getitem__ = __abs__ = __neg__ = __truediv__ = __mod__ = __getattr__ = _refuse

    def __repr__(self):
        return "Opaque(" + repr(self.type_name) + ")"


_SCALARS = (type(None), bool, int, float, str)
_SEQUENCES = {list: "list", tuple: "tuple", set: "set", frozenset: "frozenset"}
MAX_NODES = 1_000_000


def encode(value, budget=None):
    """A JSON-ready form of ``value`` that keeps exact types; at most ``MAX_NODES`` nodes."""
    if budget is None:
        budget = [MAX_NODES]
    budget[0] -= 1
    if budget[0] < 0:
        return ["opaque", "value too large"]
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind in _SEQUENCES:
        return [_SEQUENCES[kind], [encode(item, budget) for item in value]]
    if kind is dict:
        return ["dict", [[encode(k, budget), encode(v, budget)] for k, v in value.items()]]
    if kind is bytes:
        return ["bytes", value.hex()]
    return ["opaque", kind.__name__ if type(kind.__name__) is str else "object"]


def decode(data):
    """The value ``encode`` described; raises ValueError on anything it did not write."""
    if type(data) in _SCALARS:
        return data
    if type(data) is not list or len(data) != 2 or type(data[0]) is not str:
        raise ValueError("malformed value")
    tag, payload = data
    if tag == "opaque":
        return Opaque(str(payload))
    if tag == "bytes":
        return bytes.fromhex(payload)
    if type(payload) is not list:
        raise ValueError("malformed " + tag)
    if tag == "dict":
        pairs = [(decode(k), decode(v)) for k, v in payload]
        return dict(pairs) if _spread([k for k, _ in pairs]) else Opaque("dict of colliding keys")
    for kind, name in _SEQUENCES.items():
        if name == tag:
            items = [decode(item) for item in payload]
            if kind in (set, frozenset) and not _spread(items):
                return Opaque(name + " of colliding values")
            return kind(items)
    raise ValueError("unknown tag " + repr(tag))


MAX_COLLISIONS = 64


def _spread(items):
    """Whether ``items`` hash apart, so that a set or dict of them is built in linear time. A
    program can print values made to share one hash (``k * (2**61 - 1)`` for ints): a set of n
    of them costs n^2 comparisons (40,000 in its 1 MB of output: 9 s of the verifier's time).
    What an honest program's set or dict encodes is distinct values, whose hashes meet rarely
    (-1 and -2 do): at most ``MAX_COLLISIONS`` values may share a hash with another."""
    return len(items) - len({hash(item) for item in items}) <= MAX_COLLISIONS


def same(actual, expected):
    """Strict equality of decoded plain values: types must match (``True`` is not ``1``), a
    tuple may stand for a list (datasets written as JSON have no tuples), floats within 1e-9
    relative; an ``Opaque`` equals nothing."""
    if type(actual) is Opaque or type(expected) is Opaque:
        return False
    if type(expected) is float or type(actual) is float:
        if type(actual) not in (int, float) or type(expected) not in (int, float):
            return False
        if actual != actual or expected != expected:  # NaN
            return actual != actual and expected != expected
        try:
            return abs(actual - expected) <= 1e-9 * max(1.0, abs(expected))
        except OverflowError:  # an int past float's range (10**400 against 1.5): a wrong value, never the judge's failure
            return False
    if type(expected) is list and type(actual) is tuple:
        actual = list(actual)
    if type(actual) is not type(expected):
        return False
    if type(expected) in (list, tuple):
        return len(actual) == len(expected) and all(same(a, e) for a, e in zip(actual, expected))
    if type(expected) is dict:
        return actual.keys() == expected.keys() and all(same(actual[k], expected[k]) for k in expected)
    return actual == expected
