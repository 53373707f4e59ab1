"""llama.cpp's side of benchmarks/peers.py: GGUF files of the benchmark's own weights, and a worker
process that loads them with llama-cpp-python's low-level API, decodes greedily and scores
perplexity windows.

Why a separate process: llama.cpp crashed (SIGSEGV in its AMX path) on one of these machines; in
a worker a crash costs the row, not the run (the row records the worker's last log lines). It
also keeps llama.cpp's OpenMP runtime and torch's out of each other's process. Times are taken
inside the worker, so the pipe costs nothing measured.

GGUF files (cached under ``$TARDIS_CACHE_DIR/peers/gguf``, default ``~/.cache/tardis_compiler``):
``convert_hf_to_gguf.py`` from llama-cpp-python's sdist (``vendor/llama.cpp``, with its own
``gguf-py``) turns the HF folder the torch rows load into F32 and BF16 files; ``llama_model_quantize``
makes Q8_0 / Q4_0 (and F16) from the F32 one. The sdist is fetched once with
``pip download --no-deps --no-binary :all: llama-cpp-python==<installed version>`` when
``--llama-cpp-src`` / ``$TARDIS_LLAMA_CPP_SRC`` do not point at an unpacked ``vendor/llama.cpp``.

    python benchmarks/peers_llama.py quantize IN.gguf OUT.gguf Q8_0 [THREADS]   # used by gguf_files()
    python benchmarks/peers_llama.py worker                                      # used by LlamaWorker
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

#: GGUF tensor types the benchmark makes, by llama.cpp's file-type name.
FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "BF16": 32}
#: Types the HF converter writes itself (the rest are quantized from its F32 output).
CONVERTED = {"F32": "f32", "BF16": "bf16", "F16": "f16"}


def installed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        return None


def peers_cache() -> Path:
    return Path(os.environ.get("TARDIS_CACHE_DIR") or Path.home() / ".cache" / "tardis_compiler") / "peers"


def llama_cpp_source(given: str | None = None) -> Path:
    """The unpacked ``vendor/llama.cpp`` of llama-cpp-python's sdist (for ``convert_hf_to_gguf.py``):
    ``given``, ``$TARDIS_LLAMA_CPP_SRC``, or the installed version's sdist, fetched once into the cache."""
    given = given or os.environ.get("TARDIS_LLAMA_CPP_SRC")
    if given:
        path = Path(given)
        if not (path / "convert_hf_to_gguf.py").is_file():
            raise FileNotFoundError(f"{path} has no convert_hf_to_gguf.py (give the sdist's vendor/llama.cpp)")
        return path
    version = installed_version()
    if version is None:
        raise ImportError("llama-cpp-python is not installed (pip install tardis-compiler[bench]; see docs/PEERS.md)")
    root = peers_cache() / "src"
    path = root / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (path / "convert_hf_to_gguf.py").is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    tarball = root / f"llama_cpp_python-{version}.tar.gz"
    if not tarball.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(root)], check=True)
    keep = (f"llama_cpp_python-{version}/vendor/llama.cpp/convert_hf_to_gguf.py",
            f"llama_cpp_python-{version}/vendor/llama.cpp/conversion/",
            f"llama_cpp_python-{version}/vendor/llama.cpp/gguf-py/")
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(keep) or m.name == keep[0]]
        tar.extractall(root, members=members, filter="data")
    return path


def gguf_files(hf_folder: str | Path, types: list[str], *, source: str | None = None, threads: int = 2,
               log=print) -> dict[str, Path]:
    """GGUF files of the HF model in ``hf_folder``, one per type in ``types`` (``FTYPES``), made
    once and cached (keyed by the folder's name and llama-cpp-python's version)."""
    unknown = sorted(set(types) - set(FTYPES))
    if unknown:
        raise ValueError(f"unknown GGUF types {unknown}; known: {sorted(FTYPES)}")
    hf_folder = Path(hf_folder)
    out_dir = peers_cache() / "gguf" / f"{hf_folder.name}-llama-cpp-python-{installed_version()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {t: out_dir / f"{hf_folder.name}-{t}.gguf" for t in types}
    for t in types:
        if files[t].is_file():
            continue
        if t in CONVERTED:
            _convert(hf_folder, files[t], CONVERTED[t], llama_cpp_source(source), log)
        else:
            f32 = out_dir / f"{hf_folder.name}-F32.gguf"
            if not f32.is_file():
                _convert(hf_folder, f32, "f32", llama_cpp_source(source), log)
            _atomic(files[t], lambda tmp: _quantize_subprocess(f32, tmp, t, threads, log))
    return files


def _convert(hf_folder: Path, out: Path, outtype: str, source: Path, log) -> None:
    log(f"[peers] converting {hf_folder} -> {out.name} (convert_hf_to_gguf.py --outtype {outtype})")
    start = time.perf_counter()
    _atomic(out, lambda tmp: _run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(hf_folder),
                                   "--outtype", outtype, "--outfile", str(tmp)]))
    log(f"[peers] {out.name}: {out.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - start:.0f} s")


def _quantize_subprocess(src: Path, out: Path, ftype: str, threads: int, log) -> None:
    log(f"[peers] quantizing {src.name} -> {ftype} (llama_model_quantize)")
    _run([sys.executable, __file__, "quantize", str(src), str(out), ftype, str(threads)])


def _run(command: list[str]) -> None:
    """Run a converter / quantizer quietly; on failure, raise with the end of its output."""
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    if done.returncode != 0:
        tail = "\n".join(done.stdout.strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(command[:3])} ... failed (exit {done.returncode}):\n{tail}")


def _atomic(target: Path, make) -> None:
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
    os.close(fd)
    try:
        make(Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def quantize(src: str, out: str, ftype: str, threads: int = 2) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(src.encode(), out.encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {ftype}) returned {rc}")


class WorkerDied(RuntimeError):
    pass


class LlamaWorker:
    """The parent's handle on the worker process: ``call(message)`` sends one JSON command and
    returns its JSON answer; a worker that died (a crash) raises ``WorkerDied`` with its last log
    lines and is started afresh, with the rows still alive reloaded, on the next call."""

    def __init__(self, log_path: str | Path) -> None:
        self.log_path = Path(log_path)
        self.loads: dict[str, dict] = {}  # row -> its load command (replayed after a restart)
        self.proc = None

    def _start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, __file__, "worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1)
        log.close()
        for message in self.loads.values():
            self._send(message)

    def _send(self, message: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            code = self.proc.wait()
            self.proc = None
            raise WorkerDied(f"llama.cpp worker died (exit {code}) on {message['cmd']} "
                             f"{message.get('row', '')}: {self.log_tail()}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def call(self, message: dict) -> dict:
        if self.proc is None:
            self._start()
        answer = self._send(message)
        if message["cmd"] == "load":
            self.loads[message["row"]] = message
        return answer

    def forget(self, row: str) -> None:
        self.loads.pop(row, None)

    def log_tail(self, lines: int = 6) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:])

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
            self.proc = None


# ----------------------------------------------------------------------------- the worker process

def worker() -> None:
    """Answer JSON commands on stdin, one per line: load, generate, nll, info, quit."""
    import llama_cpp
    import numpy as np

    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything llama.cpp prints goes to the log, not into the protocol
    llama_cpp.llama_backend_init()
    system_info = llama_cpp.llama_print_system_info().decode()
    amx = "AMX_INT8 = 1" in system_info
    models: dict[str, object] = {}  # path -> model
    rows: dict[str, dict] = {}  # row -> {ctx, n_vocab, threads, batch}

    def load(m: dict) -> dict:
        extra = m.get("extra_bufts", "auto")
        use_extra = (not amx) if extra == "auto" else bool(extra)
        key = (m["path"], use_extra)
        if key not in models:
            params = llama_cpp.llama_model_default_params()
            params.use_extra_bufts = use_extra
            model = llama_cpp.llama_model_load_from_file(m["path"].encode(), params)
            if not model:
                raise RuntimeError(f"llama.cpp could not load {m['path']}")
            models[key] = model
        model = models[key]
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = m["n_ctx"]
        cparams.n_batch = cparams.n_ubatch = m["n_batch"]
        cparams.n_threads = cparams.n_threads_batch = m["threads"]
        cparams.no_perf = False
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            raise RuntimeError("llama_init_from_model failed")
        vocab = llama_cpp.llama_model_get_vocab(model)
        rows[m["row"]] = {"ctx": ctx, "n_vocab": llama_cpp.llama_vocab_n_tokens(vocab), "threads": m["threads"],
                          "batch": llama_cpp.llama_batch_init(m["n_batch"], 0, 1), "n_batch": m["n_batch"],
                          "vocab": vocab}
        return {"model_bytes": llama_cpp.llama_model_size(model), "n_params": llama_cpp.llama_model_n_params(model),
                "n_vocab": rows[m["row"]]["n_vocab"], "extra_bufts": use_extra, "amx_compiled_in": amx,
                "n_ctx": llama_cpp.llama_n_ctx(ctx)}

    def decode(ctx, tokens: list[int]) -> None:
        arr = (llama_cpp.llama_token * len(tokens))(*tokens)
        rc = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(tokens)))
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def generate(m: dict) -> dict:
        row = rows[m["row"]]
        ctx, n_vocab = row["ctx"], row["n_vocab"]
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        llama_cpp.llama_perf_context_reset(ctx)
        out: list[int] = []
        start = time.perf_counter()
        decode(ctx, m["prompt"])  # prefill: gives the first new token, as HF generate's first step does
        for i in range(m["n"]):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
            out.append(int(logits.argmax()))
            if i + 1 < m["n"]:
                decode(ctx, out[-1:])
        seconds = time.perf_counter() - start
        perf = llama_cpp.llama_perf_context(ctx)
        return {"seconds": seconds, "tokens": out,
                "perf": {"prefill_ms": perf.t_p_eval_ms, "prefill_tokens": perf.n_p_eval,
                         "decode_ms": perf.t_eval_ms, "decode_tokens": perf.n_eval}}

    def nll(m: dict) -> dict:
        """Summed negative log-likelihood of each window's tokens after ``prefix`` (as
        tardis_compiler.eval.metrics.perplexity scores them: with no prefix the first is skipped)."""
        row = rows[m["row"]]
        ctx, n_vocab, batch = row["ctx"], row["n_vocab"], row["batch"]
        prefix = m["prefix"]
        first = max(len(prefix), 1)
        total, count = 0.0, 0
        for window in m["windows"]:
            ids = prefix + window
            if len(ids) > row["n_batch"]:
                raise ValueError(f"window of {len(ids)} tokens > n_batch {row['n_batch']}")
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            for i, t in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1
            batch.n_tokens = len(ids)
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(len(ids), n_vocab))
            scored = logits[first - 1:len(ids) - 1].astype(np.float64)
            targets = np.asarray(ids[first:])
            peak = scored.max(1)
            lse = peak + np.log(np.exp(scored - peak[:, None]).sum(1))
            total += float((lse - scored[np.arange(len(targets)), targets]).sum())
            count += len(targets)
        return {"nll": total, "tokens": count}

    def tokenize(m: dict) -> dict:
        row = rows[m["row"]]
        text = m["text"].encode()
        buf = (llama_cpp.llama_token * (len(text) + 8))()
        n = llama_cpp.llama_tokenize(row["vocab"], text, len(text), buf, len(buf), False, False)
        return {"tokens": list(buf[:max(n, 0)])}

    handlers = {"load": load, "generate": generate, "nll": nll, "tokenize": tokenize,
                "info": lambda m: {"system_info": system_info, "amx_compiled_in": amx,
                                   "version": llama_cpp.__version__}}
    for line in sys.stdin:
        message = json.loads(line)
        try:
            answer = handlers[message["cmd"]](message)
        except Exception as e:  # noqa: BLE001  (the parent records it as the row's reason)
            answer = {"error": f"{type(e).__name__}: {e}"}
        protocol.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker()
    elif sys.argv[1:2] == ["quantize"]:
        quantize(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]) if len(sys.argv) > 5 else 2)
    else:
        sys.exit(__doc__)
