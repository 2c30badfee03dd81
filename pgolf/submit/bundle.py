"""The bundler: the exported ``train_gpt.py`` a submission ships, and its code bytes.

The challenge's size is compressed model bytes + code bytes, at most 16,000,000 (decimal).
The code is the exported ``train_gpt.py`` (``script_text``): a short bootstrap, the run's
params baked in, and a bundle of what the entry modules (``compress.code_files``: the runner
``pgolf/submit/runner.py``) run. Its code bytes are the script's length, never a list kept by
hand. What ships is found by reading code, in three steps (docs/SUBMISSION.md, "Code bytes"):

1. Options the baked params leave off: the modules in :data:`OPTION_MODULES` (a coder, TTT, the
   allocator, LQER, the size search, the output sensitivity, the variants' percentile clips and
   loaders), which the code imports only inside the branch of the option they serve,
   ship only when the params switch that option on (:func:`options_off`).
2. Tree shaking (:mod:`pgolf.submit.shake`): of each module, only what the runner's ``main`` can
   reach; a module nothing kept imports does not ship.
3. Minifying (python-minifier, :func:`minified_source`): no docstrings, comments or signature
   annotations, short local names.

With ``compress.compress_code`` the bundle travels as one compressed stream in base 93 text
(:func:`b93encode`: every printable ASCII character but ``"`` and ``\\``, 38 for every 31 bytes, where
the records' self-extracting scripts use base 85's 5 for 4). Its coder is brotli-11, or ``lrzip -z -L 9``
with ``compress.code_compressor: lrzip``, about 15 % fewer code bytes for a script that then needs
the lrzip program; without ``compress_code`` the bundle is plain text. The bundler itself never
ships: the runner does not import it. The size gate that counts these bytes is
:mod:`pgolf.artifact.size`. :func:`import_closure` is the whole static closure (every import, every
option), which the pipeline's code deps use (:mod:`pgolf.pipeline.deps`). The bundle stage writes the script
without training (``python -m stages.bundle --params FILE --out DIR --modules`` prints what
ships, module by module: :func:`module_sizes`).
"""

from __future__ import annotations

import ast
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import brotli
import python_minifier

from pgolf import __version__
from pgolf.artifact.lrzip import lrzip_compress, lrzip_declared_size, lrzip_decompress
from pgolf.config import CalibrateConfig, CompressConfig, QuantizeConfig, TrainConfig, TTTConfig, from_dict
from pgolf.submit.shake import is_type_checking_block, module_file, project_imports, shake

REPO_ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    """The ``pgolf`` names one source file imports: modules, and for ``from pgolf.room import x`` both
    ``pgolf.room`` and ``pgolf.room.x`` (``x`` may be a module or a name; ``module_file`` tells)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in _runtime_nodes(tree):
        for _, (source, name) in project_imports(node):
            names |= {source} if name is None else {source, f"{source}.{name}"}
    return names


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except the bodies of ``if TYPE_CHECKING:`` (imports for annotations only)."""
    nodes, pending = [], [tree]
    while pending:
        node = pending.pop()
        nodes.append(node)
        if is_type_checking_block(node):
            pending.extend(node.orelse)
            continue
        pending.extend(ast.iter_child_nodes(node))
    return nodes


def package_inits(name: str, root: Path) -> list[Path]:
    """The ``__init__.py`` of every package above module ``name``: importing it runs each of them."""
    parts = name.split(".")[:-1]
    inits = [root.joinpath(*parts[:depth], "__init__.py") for depth in range(1, len(parts) + 1)]
    return [init for init in inits if init.is_file()]


def import_closure(entry_files: list[str], root: Path = REPO_ROOT, exclude: frozenset[str] = frozenset()) -> list[str]:
    """Every project file the entry files need, themselves included (paths relative to ``root``).

    A module is found by reading import statements (``import pgolf.a.b``, ``from pgolf.a import b``,
    ``from pgolf.a.b import f``), and importing it runs the ``__init__.py`` of each package above it,
    so those are in the closure too. Files in ``exclude`` are neither listed nor followed.
    """
    missing = [name for name in entry_files if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"compress.code_files: not found under {root}: {', '.join(missing)}")
    seen: set[Path] = set()
    pending = [root / name for name in entry_files]
    while pending:
        path = pending.pop()
        if path in seen or str(path.relative_to(root)) in exclude:
            continue
        seen.add(path)
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        pending.extend(package_inits(module, root))
        for name in imported_modules(path):
            source = module_file(name, root)
            if source is not None:
                pending.append(source)
                pending.extend(package_inits(name, root))
    return sorted(str(p.relative_to(root)) for p in seen)


# The exported script: it imports the bundled pgolf modules from the bundle (never from an
# installed pgolf: a module missing from the bundle is an error) and runs the entry's main.
BOOTSTRAP = """\
\"\"\"Parameter Golf submission exported by pgolf {version}: the bundle holds pgolf's modules and the run's params.\"\"\"
import {imports}importlib.abc as A,importlib.util as U,json,sys
{decoder}P=json.loads({params})
F=dict(m.split("\\x1f",1)for m in {payload}.split("\\x1e")[1:])
class L(A.MetaPathFinder,A.Loader):
 def find_spec(s,n,p=None,t=None):
  k=n.replace(".","/")
  for f,g in((k+".py",0),(k+"/__init__.py",1)):
   if f in F:return U.spec_from_loader(n,s,origin=f,is_package=g)
  if k.split("/")[0]=="pgolf":raise ImportError(n+" is not in this submission")
 def exec_module(s,m):
  o=m.__file__=m.__spec__.origin;exec(compile(F[o],o,"exec"),m.__dict__)
sys.meta_path.insert(0,L())
from {entry} import main
if __name__=="__main__":sys.exit(main(P,__file__))
"""


# Base 93: the printable ASCII characters a "..." literal holds unescaped. 31 bytes are one number below 93**38,
# written as 38 digits; the stream is padded to whole blocks, and its first character says by how many bytes.
B93_ALPHABET = "".join(c for c in map(chr, range(32, 127)) if c not in '"\\')
B93_BLOCK_BYTES, B93_BLOCK_CHARS = 31, 38  # 93**38 > 2**248: 1.226 characters a byte (base 85: 1.25)

# The script's own decoder of :func:`b93encode`'s text (tests/submit/test_bundle.py holds it to b93decode).
B93_DECODER = r"""def E(s):
 a="".join(c for c in map(chr,range(32,127))if c not in'"\\');o=b""
 for i in range(1,len(s),38):
  n=0
  for c in s[i:i+38]:n=n*93+a.find(c)
  o+=n.to_bytes(31,"big")
 return o[:len(o)-a.find(s[0])]
"""


def b93encode(data: bytes) -> str:
    """``data`` as base 93 text: the pad's length as one digit, then 38 digits (most significant first) for each
    block of 31 bytes, the last padded with zero bytes."""
    pad = -len(data) % B93_BLOCK_BYTES
    padded = data + bytes(pad)
    digits = [B93_ALPHABET[pad]]
    for start in range(0, len(padded), B93_BLOCK_BYTES):
        number = int.from_bytes(padded[start:start + B93_BLOCK_BYTES], "big")
        block = []
        for _ in range(B93_BLOCK_CHARS):
            number, digit = divmod(number, 93)
            block.append(B93_ALPHABET[digit])
        digits.extend(reversed(block))
    return "".join(digits)


def b93decode(text: str) -> bytes:
    """What :func:`b93encode` encoded; a ValueError for text it cannot have written."""
    bad = sorted(set(text) - set(B93_ALPHABET))
    if not text or bad or (len(text) - 1) % B93_BLOCK_CHARS or B93_ALPHABET.index(text[0]) >= B93_BLOCK_BYTES:
        raise ValueError(f"not base 93 text of the bundler ({len(text)} characters"
                         f"{', with ' + repr(''.join(bad[:5])) if bad else ''})")
    data = b"".join(_b93_block(text[start:start + B93_BLOCK_CHARS])
                    for start in range(1, len(text), B93_BLOCK_CHARS))
    return data[:len(data) - B93_ALPHABET.index(text[0])]


def _b93_block(digits: str) -> bytes:
    number = 0
    for digit in digits:
        number = number * 93 + B93_ALPHABET.index(digit)
    if number >= 256**B93_BLOCK_BYTES:
        raise ValueError(f"base 93 block {digits!r} is above {B93_BLOCK_BYTES} bytes")
    return number.to_bytes(B93_BLOCK_BYTES, "big")


# How a script decodes its modules' stream, by compressor: what its import line adds, the lines that define the
# decoder (after the base 93 decoder E), and the decoded bytes of the stream's text. lrzip reads the stream on its
# standard input; a script on a machine without the program stops with one line that names it.
STREAM_DECODERS = {
    "brotli": ("brotli,", "", 'brotli.decompress(E("{}")).decode()'),
    "lrzip": ("os,subprocess as S,", """def D(s):
 try:return S.run(["lrzip","-dqo","-"],input=E(s),capture_output=True,check=True,env=dict(os.environ,LRZIP="NOCONFIG")).stdout.decode()
 except(OSError,S.CalledProcessError)as e:sys.exit(f"{sys.argv[0]}: its code is lrzip-coded, and lrzip (apt-get install lrzip) failed: {e}")
""", 'D("{}")'),
}


def compress_stream(data: bytes, compressor: str) -> bytes:
    """The modules' stream as a script of ``compressor`` (``compress.code_compressor``) carries it."""
    return brotli.compress(data, quality=11) if compressor == "brotli" else lrzip_compress(data)


def decompress_stream(stream: bytes, compressor: str) -> bytes:
    """What :func:`compress_stream` compressed."""
    if compressor == "brotli":
        return brotli.decompress(stream)
    size = lrzip_declared_size(stream)
    if size is None:
        raise ValueError("the script's modules are not an lrzip stream (no lrzip header): the script is corrupt")
    return lrzip_decompress(stream, size)


# Each option module, and when the baked params switch its option on. The code imports each only
# inside that option's branch, so a script without it never imports it (and would fail at once
# if it did: the bootstrap refuses a project module not in the bundle); tests/submit/test_bundle.py
# runs each compressor's and each option's shipped code.
OPTION_MODULES: dict[str, Callable[[dict[str, Any]], bool]] = {
    "pgolf.artifact.ans": lambda p: p["compress"].compressor == "ans" or p["quantize"].rate_aware,
    "pgolf.artifact.pergroup": lambda p: p["compress"].compressor == "pergroup",
    "pgolf.data.coprime": lambda p: p["train"].loader == "coprime",
    "pgolf.data.packed": lambda p: p["train"].loader == "packed",
    "pgolf.data.sequential": lambda p: p["train"].loader == "sequential",
    "pgolf.eval.ttt": lambda p: p["ttt"].enabled,
    "pgolf.quant.allocate": lambda p: p["quantize"].method == "allocate",
    "pgolf.quant.lqer": lambda p: p["quantize"].lqer_rank > 0 or p["quantize"].method == "allocate",
    "pgolf.quant.percentiles": lambda p: (p["quantize"].scale_search in ("row_percentiles", "matrix_percentiles")
                                          or p["quantize"].table_clip_quantile > 0),
    "pgolf.quant.rate": lambda p: p["quantize"].rate_aware,
    "pgolf.quant.search": lambda p: p["quantize"].fit_to_size and p["quantize"].method != "allocate",
    "pgolf.quant.sensitivity": lambda p: p["calibrate"].output_sensitivity,
}


def options_off(params: dict[str, Any]) -> frozenset[str]:
    """The option modules the baked ``params`` leave off (a section they leave out has its defaults)."""
    sections = {name: from_dict(config, params.get(name, {}), f"baked params: {name}")
                for name, config in (("calibrate", CalibrateConfig), ("compress", CompressConfig),
                                     ("quantize", QuantizeConfig), ("train", TrainConfig), ("ttt", TTTConfig))}
    return frozenset(name for name, switched_on in OPTION_MODULES.items() if not switched_on(sections))


@functools.lru_cache(maxsize=256)  # a pure function of its text: scripts of several params share most modules
def minified_source(source: str, path: str) -> str:
    """``source`` as it ships, by python-minifier: the same code, fewer bytes.

    Safe by construction, each transform keeps what runs: docstrings and other bare literal
    statements go (nothing reads ``__doc__`` in shipped code), local names shorten (never
    globals, which other modules import, nor arguments, which callers may pass by keyword),
    signature and local-variable annotations go (postponed: never evaluated), class-level ones
    stay (dataclass fields; ``typing.get_type_hints`` checks config sections and finds the
    runner's sections by them). Left as written: asserts (checks), literals (hoisting them into
    globals makes the brotli stream larger), one statement per line.
    """
    if not source.strip():
        return ""
    return python_minifier.minify(source, filename=path, remove_literal_statements=True, hoist_literals=False,
                                  rename_locals=True, rename_globals=False, remove_asserts=False) + "\n"


def shipped_files(entry_files: list[str], params: dict[str, Any], root: Path = REPO_ROOT) -> dict[str, str]:
    """Path -> shipped source of every module a script with these baked ``params`` carries."""
    shaken = shake(entry_files, root, options_off(params))
    return {path: minified_source(source, path) for path, source in sorted(shaken.items())}


def module_sizes(files: dict[str, str], root: Path = REPO_ROOT) -> list[dict[str, Any]]:
    """What each shipped module (``files``: path -> shipped source) weighs, heaviest first: its source as
    written, as shipped, and shipped and brotli-compressed alone (in a script all share one stream)."""
    rows = [{"path": path, "written": (root / path).stat().st_size, "shipped": len(source.encode("utf-8")),
             "compressed": len(brotli.compress(source.encode("utf-8"), quality=11)) if source else 0}
            for path, source in files.items()]
    return sorted(rows, key=lambda row: (-row["compressed"], row["path"]))


def script_json(value: Any) -> str:
    """``value`` as the script carries its baked params: compact JSON, keys sorted."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# The modules' text: each module as MODULE_MARK, its path, PATH_END, its source (JSON would escape every newline
# and quote of the sources). Neither character is in any source the bundler ships (modules_text refuses one).
MODULE_MARK, PATH_END = "\x1e", "\x1f"


def modules_text(files: dict[str, str]) -> str:
    """The text the script carries for ``files`` (path -> shipped source), as its bootstrap reads it."""
    for path, source in files.items():
        if MODULE_MARK in path + source or PATH_END in path + source:
            raise ValueError(f"{path}: holds the bundle's separator \\x1e or \\x1f: write it as an escape")
    return "".join(f"{MODULE_MARK}{path}{PATH_END}{source}" for path, source in files.items())


def read_modules(text: str) -> dict[str, str]:
    """Path -> source of a script's modules' text (:func:`modules_text`)."""
    if text and not text.startswith(MODULE_MARK):
        raise ValueError("the script's modules are not the bundler's text (no module mark at its start)")
    modules = [module.split(PATH_END, 1) for module in text.split(MODULE_MARK)[1:]]
    if any(len(module) != 2 for module in modules):
        raise ValueError("the script's modules are not the bundler's text (a module without its path)")
    return dict(modules)


def bundle(entry_files: list[str], params: dict[str, Any], root: Path = REPO_ROOT) -> str:
    """The text of what the script ships (:func:`modules_text`): path -> shipped source."""
    return modules_text(shipped_files(entry_files, params, root))


def script_text(entry_files: list[str], params: dict[str, Any], compressor: str | None = "brotli",
                root: Path = REPO_ROOT) -> str:
    """The exported ``train_gpt.py``: the bootstrap, the params, the bundle and the run of ``entry_files[0]``.

    ``compressor``: the modules' stream coder (``CompressConfig.script_compressor``: brotli, lrzip, or None for
    plain text). The params travel as plain JSON text beside the compressed modules: readable at the top
    of the script, and a retune that keeps every value's printed width (``eval_stride``
    16 -> 32) keeps the script's length, so the stages that count it need not re-run.
    """
    text = bundle(entry_files, params, root)
    if compressor is None:
        imports, decoder, payload = "", "", repr(text)
    else:
        imports, decoder, expression = STREAM_DECODERS[compressor]
        decoder = B93_DECODER + decoder
        payload = expression.format(b93encode(compress_stream(text.encode("utf-8"), compressor)))
    return BOOTSTRAP.format(version=__version__, imports=imports, decoder=decoder, params=repr(script_json(params)),
                            payload=payload, entry=entry_files[0].removesuffix(".py").replace("/", "."))


def read_bundle(script: str) -> dict[str, Any]:
    """The ``params`` and ``files`` (path -> source) of a script that ``script_text`` wrote."""
    tree = ast.parse(script)
    return {"params": json.loads(_assigned_text(tree, "P")), "files": read_modules(_assigned_text(tree, "F"))}


def read_params(script: str) -> dict[str, Any]:
    """The params a script that ``script_text`` wrote carries, as written (with ``compress.bake_params: changed``
    only those), read without decoding its modules (which, lrzip-coded, would run the lrzip program)."""
    return json.loads(_assigned_text(ast.parse(script), "P"))


def _assigned_text(tree: ast.Module, name: str) -> str:
    """The text the script's assignment to ``name`` reads: its plain literal, or its decoded modules' stream (the
    first literal that is not a separator, or the first call of a :data:`STREAM_DECODERS` decoder, in it)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [name]:
            for part in ast.walk(node.value):
                if isinstance(part, ast.Call) and stream_compressor(part) is not None:
                    literal = next(n.value for n in ast.walk(part) if isinstance(n, ast.Constant))
                    return decompress_stream(b93decode(literal), stream_compressor(part)).decode("utf-8")
                if isinstance(part, ast.Constant) and isinstance(part.value, str) and part.value not in (
                        MODULE_MARK, PATH_END):
                    return part.value
    raise ValueError("not a script exported by pgolf: no params and bundle in it")


def stream_compressor(call: ast.Call) -> str | None:
    """The compressor whose :data:`STREAM_DECODERS` expression ``call`` is, or None for any other call."""
    called = ast.unparse(call.func)
    return next((name for name, (_, _, expression) in STREAM_DECODERS.items() if expression.startswith(called + "(")),
                None)


def code_bytes(entry_files: list[str], params: dict[str, Any], compressor: str | None = "brotli",
               root: Path = REPO_ROOT) -> int:
    """The bytes of the code a submission ships: the length of its exported script."""
    return len(script_text(entry_files, params, compressor, root).encode("utf-8"))
