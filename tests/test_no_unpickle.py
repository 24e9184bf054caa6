"""Nothing in ``src/`` unpickles: a static (``ast``) scan for the ways Python code can.

Unpickling runs arbitrary code from the file, so weights are read with safetensors or
``torch.load(..., weights_only=True)``, and arrays with ``numpy.load`` (``allow_pickle`` off).
The detector flags:

* ``import pickle`` / ``cPickle`` / ``_pickle`` / ``dill`` / ``cloudpickle`` and ``from`` those,
  except an import used only for the exception class a refused load raises
  (``pickle.UnpicklingError``, ``pickle.PickleError``): catching that error is how a
  ``weights_only`` load reports a file with pickled objects, not a way of unpickling;
* ``joblib.load``, ``pandas.read_pickle`` (``pd.read_pickle``, ``DataFrame.read_pickle``...);
* ``numpy.load(..., allow_pickle=<anything but False>)``;
* ``torch.load`` without the keyword ``weights_only=True``.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle"}
_EXCEPTIONS_ONLY = {"UnpicklingError", "PickleError"}


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` for a Name/Attribute chain, else ``""``."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _pickle_uses(tree: ast.AST, alias: str) -> list[str]:
    """The attributes of a module alias used in the tree (``"*"`` for any bare use)."""
    attrs = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _dotted(node.value) == alias:
            attrs.add(node.attr)
    bare = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Name) and n.id == alias and isinstance(n.ctx, ast.Load)
    ]
    n_attr = sum(
        1
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == alias
    )
    return sorted(attrs) + (["*"] if len(bare) > n_attr else [])


def _unpickling_call(call: ast.Call) -> str | None:
    """What is wrong with a call, or ``None`` when it does not unpickle."""
    name = _dotted(call.func)
    if name.rsplit(".", 1)[-1] == "read_pickle" or name in ("joblib.load", "dill.load"):
        return f"{name}()"
    if name in ("torch.load", "th.load"):
        ok = _is_const(_keyword(call, "weights_only"), True)
        return None if ok else "torch.load without weights_only=True"
    if name in ("np.load", "numpy.load") and _keyword(call, "allow_pickle") is not None:
        ok = _is_const(_keyword(call, "allow_pickle"), False)
        return None if ok else f"{name}(allow_pickle=...) not False"
    return None


def find_unpickling(source: str, filename: str = "<string>") -> list[str]:
    """Every unpickling construct in ``source``, as ``"file:line: what"``."""
    tree = ast.parse(source, filename)
    found: list[str] = []

    def flag(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{getattr(node, 'lineno', 0)}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")[0]
                if top in _PICKLE_MODULES:
                    uses = _pickle_uses(tree, a.asname or a.name)
                    if top == "dill" or not uses or not set(uses) <= _EXCEPTIONS_ONLY:
                        flag(node, f"import {a.name} (used as: {', '.join(uses) or 'nothing'})")
                elif top == "joblib" and "load" in _pickle_uses(tree, a.asname or a.name):
                    flag(node, "joblib.load")
        elif isinstance(node, ast.ImportFrom) and node.module:
            top = node.module.split(".")[0]
            names = {a.name for a in node.names}
            if top in _PICKLE_MODULES and (top == "dill" or not names <= _EXCEPTIONS_ONLY):
                flag(node, f"from {node.module} import {', '.join(sorted(names))}")
            if top == "joblib" and "load" in names:
                flag(node, "from joblib import load")
            if top == "pandas" and "read_pickle" in names:
                flag(node, "from pandas import read_pickle")
            if top == "torch" and "load" in names:
                flag(node, "from torch import load (call torch.load(..., weights_only=True))")
            if top == "numpy" and "load" in names:
                flag(node, "from numpy import load (call numpy.load, allow_pickle off)")
        elif isinstance(node, ast.Call):
            what = _unpickling_call(node)
            if what:
                flag(node, what)
    return found


# ------------------------------------------------------------------------------------------
# The detector itself
# ------------------------------------------------------------------------------------------


def test_planted_violations_are_caught() -> None:
    planted = {
        "import pickle\npickle.load(open('f', 'rb'))\n": "import pickle",
        "import pickle as pk\nx = pk.loads(b'')\n": "import pickle",
        "from pickle import load\n": "from pickle import load",
        "import cPickle\n": "import cPickle",
        "import dill\n": "import dill",
        "from dill import loads\n": "from dill import loads",
        "import joblib\nm = joblib.load('m.pkl')\n": "joblib.load",
        "from joblib import load\n": "from joblib import load",
        "import numpy as np\nnp.load('a.npy', allow_pickle=True)\n": "allow_pickle",
        "import numpy\nnumpy.load('a.npy', allow_pickle=flag)\n": "allow_pickle",
        "import pandas as pd\npd.read_pickle('x.pkl')\n": "read_pickle",
        "import torch\ntorch.load('w.pt')\n": "torch.load without",
        "import torch\ntorch.load('w.pt', weights_only=False)\n": "torch.load without",
        "import torch\ntorch.load('w.pt', weights_only=flag)\n": "torch.load without",
        "import torch\ntorch.load('w.pt', map_location='cpu')\n": "torch.load without",
        "from torch import load\n": "from torch import load",
    }
    for source, what in planted.items():
        found = find_unpickling(source)
        assert any(what in hit for hit in found), (source, found)
        assert all(hit.startswith("<string>:") for hit in found), found


def test_clean_code_passes() -> None:
    clean = [
        "import torch\nstate = torch.load(p, weights_only=True)\n",
        "import torch\nstate = torch.load(p, map_location='cpu', weights_only=True)\n",
        "import numpy as np\na = np.load('a.npy')\nb = np.load('b.npy', allow_pickle=False)\n",
        "import json\njson.load(open('x'))\n",
        "from safetensors.torch import load_file\nload_file('w.safetensors')\n",
        # catching the error a refused weights_only load raises is not unpickling
        "import pickle\ntry:\n    pass\nexcept pickle.UnpicklingError:\n    pass\n",
        "from pickle import UnpicklingError\n",
        "model.load(path)\nFusionHead.load(head)\n",
    ]
    for source in clean:
        assert find_unpickling(source) == [], source


def test_pickle_import_used_beyond_its_exceptions_is_caught() -> None:
    source = (
        "import pickle\ntry:\n    pickle.loads(b'')\nexcept pickle.UnpicklingError:\n    pass\n"
    )
    found = find_unpickling(source)
    assert len(found) == 1 and "loads" in found[0]
    passed_on = "import pickle\nhandler(pickle)\n"  # the module object escapes: flag it
    assert find_unpickling(passed_on)


# ------------------------------------------------------------------------------------------
# The source tree
# ------------------------------------------------------------------------------------------


def test_src_has_no_unpickling() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 50, f"found only {len(files)} Python files under {SRC}"
    found = [
        hit
        for f in files
        for hit in find_unpickling(f.read_text(encoding="utf-8"), str(f.relative_to(SRC)))
    ]
    assert found == [], "unpickling in src/:\n" + "\n".join(found)


def test_src_torch_loads_are_seen() -> None:
    """The scan reaches the real ``torch.load`` calls (so a regression there would be caught)."""
    calls = []
    for f in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and _dotted(node.func) == "torch.load":
                calls.append((f.name, _is_const(_keyword(node, "weights_only"), True)))
    assert calls, "expected at least one torch.load call in src/"
    assert all(ok for _, ok in calls), calls
