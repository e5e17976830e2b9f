"""Out-of-core merge: a sharded transformers checkpoint in, the merged checkpoint out, one tensor at a time.

The model is built and captured on the meta device (no weight is materialised: the graph only resolves the sites
and the spec), the plan loads the adapters, and each output tensor is read from its shard (a memory map of its
bytes), merged exactly as ``compile`` merges it (``AdapterKind.merge_into`` / ``merge``) and streamed to its output
shard. Meanwhile, from the start, a thread copies every tensor's input bytes into place in the kernel (``_Shards``):
writing is the floor of the merge's time and needs nothing the capture decides, so it runs while the graph is
captured; the merged tensors are then written over their copies, or in their place where the copy had not got
there. Memory holds one tensor and its temporaries, never a shard or the model. The output folder is written beside
the destination and renamed into place, so an interrupted run leaves nothing.
"""

from __future__ import annotations

import collections
import errno
import json
import math
import mmap
import os
import shutil
import struct
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from torch import fx, nn

from .atomic import check_destination, replaced_folder, start_writeback
from .capture import capture_graph
from .driver import SpecLike
from .errors import CheckpointError, MergeError, SpecError
from .gc_pause import gc_paused
from .ir import Placement
from .passes.merge import check_finite, finite
from .plan import make_plan
from .rewrite import get_attr
from .sites import Site
from .spec import load_spec

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
Progress = Callable[[str, int, int], None]  # (output shard, bytes written, its size)


@dataclass
class _SiteMerge:
    """The adapters merged into one site's weight (and bias), in order."""

    site: Site
    weight_key: str
    bias_key: str | None
    adapters: list[tuple[str, Placement]] = field(default_factory=list)


@gc_paused()
def merge_checkpoint(
    spec: SpecLike,
    model_dir: str | Path,
    output: str | Path,
    *,
    max_shard_size: int | str = "2GB",
    progress: Progress | None = None,
) -> Path:
    """Merge every active adapter of ``spec`` into the checkpoint in ``model_dir``; write it to ``output``.

    ``output`` must not exist. The result has the input's config (untied where a tied weight was merged on one
    side only), tensor names and dtypes, in shards of at most ``max_shard_size`` with their index. The merge runs on
    torch's threads (``torch.set_num_threads``) while a thread of its own writes.
    """
    spec, base_dir = load_spec(spec)
    model_dir, output = Path(model_dir), Path(output)
    shard_bytes = _shard_size(max_shard_size)
    if check_destination(output, "folder", "--output").exists():
        raise SpecError(f"--output: {output} exists; the merged checkpoint goes to a new folder")
    names = _merged_adapters(spec)
    source = _Source(model_dir)
    config = _json_object(model_dir / "config.json")
    with replaced_folder(output) as tmp, _Shards(tmp, source, shard_bytes) as shards:  # staged, renamed in whole
        shards.start({})  # every tensor copied as it is, while the graph is captured and the adapters planned
        model = _meta_model(model_dir, source)
        gm = capture_graph(
            model, {"input_ids": torch.zeros(1, 8, dtype=torch.long, device="meta")}, method=spec.capture
        )
        plan = make_plan(gm, spec, base_dir)
        sites = _site_merges(gm, plan.placements, names, source)
        overrides = {_key(gm, o.target, source): o.tensor for o in plan.overrides if o.adapter in names}
        untied = _untie(gm, sites, source)
        if untied:
            config["tie_word_embeddings"] = False
            shards.start(untied)  # more tensors: another layout, copied anew
        allow = {n for n in names if getattr(spec.adapters[n], "allow_nonfinite", False)}
        shards.finish(_Tensors(source, sites, overrides, untied, allow), progress)
        if shards.split.is_sharded:
            index = {"metadata": shards.split.metadata, "weight_map": shards.split.tensor_to_filename}
            (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for extra in sorted(model_dir.iterdir()):  # tokenizer, generation config: what serving needs besides
            if extra.is_file() and extra.name != "config.json" and not _weights_file(extra.name):
                shutil.copy2(extra, tmp / extra.name)
    return output


def _json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"--model: {path.name} is not readable JSON ({error})") from error
    if not isinstance(value, dict):
        raise CheckpointError(f"--model: {path.name} is not a JSON object")
    return value


def _shard_size(value: int | str) -> int:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(value)
    except (ValueError, TypeError):
        size = 0
    if not isinstance(size, int) or size < 1:
        raise SpecError(f"--max-shard-size: {value!r} is not a size (e.g. 500MB, 5GB, or a number of bytes)")
    return size


def _merged_adapters(spec: Any) -> list[str]:
    if spec.routing is not None:
        raise SpecError("routing: a merged checkpoint has one set of weights; routed adapters need a graph")
    active = spec.active_adapters()
    merged = active if spec.merge is False else spec.merged_adapters()
    live = [name for name in active if name not in merged]
    if live:
        raise SpecError(f"merge: {', '.join(live)} would stay live, but a checkpoint holds weights only: merge them")
    return merged


class _Source:
    """The input checkpoint's tensors by key: which shard, shape, dtype and byte range, read one at a time.

    Each shard's header lists them (read alone: ``safe_open`` maps the whole shard copy-on-write, private memory
    the size of the shard to the kernel's accounting); each tensor is then a zero-copy view of a memory map of its
    own bytes, unmapped when the tensor is dropped, so what was read does not stay resident (``safe_open``'s
    ``get_tensor`` copies out of its map of the shard, whose touched pages stay in the process's RSS until it is
    closed).
    """

    def __init__(self, model_dir: Path) -> None:
        if not (model_dir / "config.json").is_file():
            raise CheckpointError(f"--model: {model_dir} is not a transformers model directory (no config.json)")
        if (model_dir / INDEX).is_file():
            weight_map = _json_object(model_dir / INDEX).get("weight_map")
            if not (
                isinstance(weight_map, dict)
                and weight_map
                and all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())
            ):
                raise CheckpointError(f"--model: {INDEX} has no weight_map (tensor names to shard files)")
        elif (model_dir / SINGLE).is_file():
            weight_map = None
        else:
            raise CheckpointError(
                f"--model: {model_dir} has no safetensors weights ({SINGLE} or {INDEX}); pickled weights are not read"
            )
        self.dir = model_dir
        self.shard: dict[str, str] = {}
        self.meta: dict[str, tuple[list[int], torch.dtype]] = {}
        self.span: dict[str, tuple[int, int]] = {}  # absolute byte range in the shard file
        for shard in sorted(set(weight_map.values())) if weight_map else [SINGLE]:
            if Path(shard).name != shard or shard in ("", ".", ".."):  # only files of the model's own folder are read
                raise CheckpointError(f"--model: {INDEX} names {shard!r} as a shard: not a file name in {model_dir}")
            if not (model_dir / shard).is_file():
                raise CheckpointError(f"--model: {shard}, named in {INDEX}, is missing or not a file")
            try:
                size = (model_dir / shard).stat().st_size
                with open(model_dir / shard, "rb") as raw:
                    (length,) = struct.unpack("<Q", raw.read(8))
                    if length > min(size - 8, _HEADER_BYTES):  # a foreign file's length is noise: not read
                        raise ValueError(f"a header of {length} bytes in a file of {size}")
                    header = json.loads(raw.read(length))
            except OSError as error:
                raise CheckpointError(f"--model: {shard} cannot be read ({error})") from error
            except (struct.error, ValueError) as error:
                raise CheckpointError(f"--model: {shard} is not a safetensors file ({error})") from error
            if not isinstance(header, dict):
                raise CheckpointError(f"--model: {shard} is not a safetensors file (its header is not an object)")
            spans = {}
            for key in sorted(header.keys() - {"__metadata__"}):  # safe_open's order
                try:
                    entry = header[key]
                    (begin, stop), shape, dtype = entry["data_offsets"], list(entry["shape"]), _DTYPES[entry["dtype"]]
                    if not all(isinstance(v, int) and v >= 0 for v in (begin, stop, *shape)) or begin > stop:
                        raise ValueError("negative or non-integer offsets or dims")
                    if stop - begin != math.prod(shape) * dtype.itemsize:
                        raise ValueError(f"{stop - begin} bytes for {entry['dtype']} {shape}")
                except (KeyError, TypeError, ValueError) as error:
                    raise CheckpointError(
                        f"--model: {shard}: entry {key!r} of its header is malformed ({error})"
                    ) from error
                if 8 + length + stop > size:  # a map past the end of the file faults when read
                    raise CheckpointError(f"--model: {shard} is truncated: {key} ends past its {size} bytes")
                if key in self.shard:
                    raise CheckpointError(f"--model: tensor {key!r} is stored twice, in {self.shard[key]} and {shard}")
                self.shard[key] = shard
                self.meta[key] = (shape, dtype)
                spans[key] = (begin, stop)
                self.span[key] = (8 + length + begin, 8 + length + stop)
            _check_layout(shard, spans, size - 8 - length)
        self.keys = list(self.shard)

    def shape(self, key: str) -> list[int]:
        return self.meta[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self.meta[key][1]

    def read(self, key: str) -> torch.Tensor:
        """``key``'s tensor, a read-only view of its bytes in the file (copy-on-write: never written back)."""
        (shape, dtype), (begin, stop) = self.meta[key], self.span[key]
        if stop == begin:
            return torch.empty(shape, dtype=dtype)
        start = begin - begin % mmap.ALLOCATIONGRANULARITY
        with open(self.dir / self.shard[key], "rb") as f:
            mapped = mmap.mmap(f.fileno(), stop - start, offset=start, access=mmap.ACCESS_COPY)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frombuffer's note on sharing memory: the view is only read
            flat = torch.frombuffer(mapped, dtype=torch.uint8, offset=begin - start, count=stop - begin)
        if (begin - start) % dtype.itemsize:  # a tensor not aligned to its element size (odd-sized ones before it)
            flat = flat.clone()
        return flat.view(dtype).reshape(shape)


def _check_layout(shard: str, spans: dict[str, tuple[int, int]], data_bytes: int) -> None:
    """The tensors' byte ranges tile the shard's data, as safetensors requires: an overlap or a gap (a header
    rewritten by hand, a key given twice and read once) would copy one tensor's bytes into another's place."""
    end, before = 0, "the header"
    for key, (begin, stop) in sorted(spans.items(), key=lambda item: item[1]):
        if begin < end:
            raise CheckpointError(f"--model: {shard}: {key!r} starts at byte {begin}, inside {before} (ends at {end})")
        if begin > end:
            raise CheckpointError(f"--model: {shard}: {key!r} starts {begin - end} bytes past the end of {before}")
        end, before = stop, repr(key)
    if data_bytes < end:
        raise CheckpointError(f"--model: {shard} is truncated: its header reaches past its end")
    if end != data_bytes:
        raise CheckpointError(f"--model: {shard} has {data_bytes - end} bytes after its last tensor, {before}")


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def _meta_model(model_dir: Path, source: _Source) -> nn.Module:
    """The model of ``config.json`` on the meta device, each parameter in its checkpoint dtype."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        with torch.device("meta"):
            try:
                model = AutoModelForCausalLM.from_config(config)
            except ValueError:
                model = AutoModel.from_config(config)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"--model: config.json: transformers cannot build a model from it ({error})") from error
    for name, param in model.named_parameters():
        if name in source.meta:
            if list(param.shape) != source.shape(name):  # as from_pretrained refuses it: the config is not the model's
                raise CheckpointError(
                    f"--model: config.json makes {name} {list(param.shape)}, but {source.shard[name]} holds it as "
                    f"{source.shape(name)}"
                )
            param.data = torch.empty(source.shape(name), dtype=source.dtype(name), device="meta")
    return model.eval()


def _key(gm: fx.GraphModule, target: str, source: _Source) -> str:
    """The checkpoint key of a graph attribute: its own name, or that of a tied alias the checkpoint stores."""
    if target in source.meta:
        return target
    value = get_attr(gm, target)
    for name, tensor in gm.named_parameters(remove_duplicate=False):
        if tensor is value and name in source.meta:
            return name
    raise CheckpointError(f"--model: the checkpoint has no tensor {target!r} (nor a tied alias of it)")


def _site_merges(gm: fx.GraphModule, placements: list[Placement], names: list[str], source: _Source) -> dict:
    """Per written key (weight and bias), the site merge that produces it."""
    by_site: dict[fx.Node, _SiteMerge] = {}
    for p in placements:
        if p.adapter not in names:
            continue
        a = p.site_adapter
        for role, tensor in a.tensors.items():
            if tensor.is_meta:
                raise MergeError(
                    f"adapters.{p.adapter}: {a.kind.name} at {a.site.module} derives {role} from the base weight when "
                    "created, which a merge out of core does not load: compile the model, or save the adapter first"
                )
        site = a.site
        if site.node not in by_site:
            bias = _own_name(gm, site, "bias", site.bias) if site.bias is not None else None
            by_site[site.node] = _SiteMerge(site, _own_name(gm, site, "weight", site.weight), bias)
        by_site[site.node].adapters.append((p.adapter, p))
    out = {}
    for merge in by_site.values():
        for target in (merge.weight_key, merge.bias_key):
            if target is not None:
                if target in out:
                    raise MergeError(f"merge: {target} is read by two merged sites; out of core cannot split it")
                out[target] = merge
    return out


def _own_name(gm: fx.GraphModule, site: Site, role: str, node: fx.Node) -> str:
    """The site's module's own name for a tensor: torch.export reads a tied weight under one alias for every user
    (the embedding may read ``lm_head.weight``), but the merge belongs to the module that owns the site."""
    own = f"{site.module}.{role}"
    try:
        if get_attr(gm, own) is get_attr(gm, str(node.target)):
            return own
    except AttributeError:
        pass
    return str(node.target)


def _untie(gm: fx.GraphModule, sites: dict[str, _SiteMerge], source: _Source) -> dict[str, str]:
    """A tied weight merged on one side only: every alias gets a tensor of its own, the merged one its merge.

    Returns {written key the checkpoint lacks: the stored key it starts from} (e.g. ``lm_head.weight``, tied to
    ``model.embed_tokens.weight``): the output is then untied (``tie_word_embeddings: false``).
    """
    params = list(gm.named_parameters(remove_duplicate=False))
    untied = {}
    for target in sites:
        value = get_attr(gm, target)
        aliases = [name for name, tensor in params if tensor is value]
        if len(aliases) > 1:
            stored = _key(gm, target, source)
            untied.update({alias: stored for alias in aliases if alias not in source.meta})
    return untied


class _Tensors:
    """Every output tensor by key: read, merged where a site needs it (weight and bias together), dtype kept.

    Merges write into buffers handed back once their tensor is written (``release``): a new buffer each weight would
    fault every page in again (some 0.5 s a GiB here), and at most three are in use at a time."""

    def __init__(self, source: _Source, sites: dict[str, _SiteMerge], overrides: dict, untied: dict, allow: set):
        self.source, self.sites, self.overrides, self.untied, self.allow = source, sites, overrides, untied, allow
        self.pending: dict[str, torch.Tensor] = {}  # a site's other output, until its turn comes
        self.spare: list[torch.Tensor] = []  # flat byte buffers, free
        self.lent: dict[int, torch.Tensor] = {}  # by address: the buffers merges hold
        self.lock = threading.Lock()  # release runs on the writer's thread

    def made(self, key: str) -> bool:
        """Whether ``key``'s output differs from its input's bytes (merged, or replaced by an adapter)."""
        return key in self.sites or key in self.overrides or self.untied.get(key, key) in self.overrides

    def get(self, key: str) -> torch.Tensor:
        if key in self.pending:
            return self.pending.pop(key)
        merge = self.sites.get(key)
        if merge is None:
            return self._base(key)
        weight, bias = self._merge(merge)
        if merge.bias_key is not None and key == merge.weight_key:
            self.pending[merge.bias_key] = bias
        elif merge.bias_key is not None:
            self.pending[merge.weight_key] = weight
        return weight if key == merge.weight_key else bias

    def _base(self, key: str) -> torch.Tensor:
        stored = self.untied.get(key, key)
        if stored in self.overrides or key in self.overrides:
            return self.overrides.get(key, self.overrides.get(stored)).to(self.source.dtype(stored))
        return self.source.read(stored)

    def _merge(self, merge: _SiteMerge) -> tuple[torch.Tensor, torch.Tensor | None]:
        raw = weight = self._base(merge.weight_key)
        raw_bias = bias = self._base(merge.bias_key) if merge.bias_key is not None else None
        for name, placement in merge.adapters:
            a = placement.site_adapter
            allow = name in self.allow
            if not allow:
                check_finite(name, a.site.module, a.tensors)
            with torch.no_grad():
                before, out = weight, self._buffer(weight)
                done = a.kind.merge_into(a, out, weight, bias, a.tensors)
                weight, bias = done or a.kind.merge(a, weight, raw, bias, raw_bias, a.tensors)
            for unused in (before, out):  # an earlier adapter's result, read; a buffer merge_into declined
                if unused is not weight:
                    self.release(unused)
            if not allow and not finite(weight):
                raise MergeError(f"merge: adapter {name!r} at {a.site.module}: the merged weight is not finite")
        return weight, bias

    def _buffer(self, like: torch.Tensor) -> torch.Tensor:
        size = like.numel() * like.element_size()
        with self.lock:  # the smallest spare that holds it (they are sorted by size), else a new one
            fits = next((i for i, b in enumerate(self.spare) if b.numel() >= size), None)
            flat = torch.empty(size, dtype=torch.uint8) if fits is None else self.spare.pop(fits)
            self.lent[flat.data_ptr()] = flat
        return flat[:size].view(like.dtype).view(like.shape)

    def release(self, tensor: torch.Tensor) -> None:
        """``tensor`` is written (or was a step of a merge): its buffer, if a merge had it, serves the next one."""
        with self.lock:
            flat = self.lent.pop(tensor.data_ptr(), None)
            if flat is not None:
                self.spare = sorted([*self.spare, flat], key=torch.Tensor.numel)[-3:]


@dataclass
class _Piece:
    """One output tensor's place: the input tensor it starts from, and its bytes in the output shard."""

    key: str
    stored: str
    shard: int
    offset: int  # absolute, in the output shard file
    size: int


class _Shards:
    """The output shards, written by two threads into files sized from the start (every shape and dtype is known,
    so each header is written first and each tensor at its offset).

    ``start`` copies every tensor's input bytes to its place on a thread of its own (``copy_file_range``: in the
    kernel, no page through Python; threads release the GIL in it, so it runs beside the capture). ``finish`` then
    tells it which tensors a merge changes, so it skips those it has not reached yet, and writes them itself: over
    the copy where it got there first (after it, never before), in their place otherwise.
    """

    def __init__(self, folder: Path, source: _Source, shard_bytes: int) -> None:
        self.folder, self.source, self.shard_bytes = folder, source, shard_bytes
        self.inputs = {name: os.open(source.dir / name, os.O_RDONLY) for name in sorted(set(source.shard.values()))}
        self.outputs: list[int] = []
        self.files: list[str] = []
        self.copier: threading.Thread | None = None

    def __enter__(self) -> _Shards:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()
        for fd in self.inputs.values():
            os.close(fd)

    def start(self, untied: dict[str, str]) -> None:
        """Lay the shards out (``untied``: written keys the checkpoint lacks, and the stored key each starts from)
        and start copying into them, anew if a copy into another layout was running."""
        self._stop()
        for name in self.files:  # a layout given up: its shards go
            (self.folder / name).unlink()
        keys = dict.fromkeys([*self.source.keys, *untied])  # output tensors, input order
        layout = {
            k: torch.empty(self.source.shape(s), dtype=self.source.dtype(s), device="meta")
            for k, s in ((k, untied.get(k, k)) for k in keys)
        }
        self.split = split_torch_state_dict_into_shards(layout, max_shard_size=self.shard_bytes)
        self.files = list(self.split.filename_to_tensors)
        self.pieces: list[_Piece] = []
        self.sizes: list[int] = []
        for number, (name, shard_keys) in enumerate(self.split.filename_to_tensors.items()):
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for key in shard_keys:
                meta = layout[key]
                size = meta.numel() * meta.element_size()
                header[key] = {
                    "dtype": _NAMES[meta.dtype],
                    "shape": list(meta.shape),
                    "data_offsets": [offset, offset + size],
                }
                offset += size
            encoded = json.dumps(header, separators=(",", ":")).encode()
            encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
            start = 8 + len(encoded)
            fd = os.open(self.folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            self.outputs.append(fd)
            _write_at(fd, memoryview(struct.pack("<Q", len(encoded)) + encoded), 0)
            os.ftruncate(fd, start + offset)
            for key in shard_keys:
                begin, stop = header[key]["data_offsets"]
                self.pieces.append(_Piece(key, untied.get(key, key), number, start + begin, stop - begin))
            self.sizes.append(offset)
        self.skip: set[str] = set()
        self.claimed, self.copied, self.stopping, self.error = -1, 0, False, None
        self.turn = threading.Condition()
        self.copier = threading.Thread(target=self._copy, name="peftfx-merge-copy", daemon=True)
        self.copier.start()

    def finish(self, tensors: _Tensors, progress: Progress | None) -> None:
        """Write the tensors ``tensors`` makes, the next ones made while ``_AHEAD`` are written (never waiting for the
        copier but where it is inside that tensor's place); then wait for the copies."""
        made = {p.key for p in self.pieces if tensors.made(p.key)}
        with self.turn:
            self.skip, reached = made, self.claimed
        names = list(self.split.filename_to_tensors)
        done, pending = [0] * len(names), collections.deque()
        with ThreadPoolExecutor(1) as writer:  # at most _AHEAD + 1 tensors in memory: those written and the one made
            for number, piece in enumerate(self.pieces):
                if piece.key in made:
                    tensor, meta = tensors.get(piece.key), self.source.meta[piece.stored]
                    if tensor.dtype != meta[1] or list(tensor.shape) != list(meta[0]):
                        raise MergeError(
                            f"merge: {piece.key} came out {tensor.dtype} {list(tensor.shape)}, not as stored"
                        )
                    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
                    if number <= reached:
                        self._wait(number)  # the copier got there: write over its copy, not under it
                    if len(pending) == _AHEAD:
                        pending.popleft().result()
                    pending.append(writer.submit(self._write, tensors, tensor, data, piece))
                done[piece.shard] += piece.size  # written, or being written by the writer or the copier
                if progress is not None:
                    progress(names[piece.shard], done[piece.shard], self.sizes[piece.shard])
            for write in pending:
                write.result()
        self._wait(len(self.pieces) - 1)
        self._stop()

    def _write(self, tensors: _Tensors, tensor: torch.Tensor, data: torch.Tensor, piece: _Piece) -> None:
        _write_at(self.outputs[piece.shard], data, piece.offset)
        start_writeback(self.outputs[piece.shard], piece.offset, piece.size)
        tensors.release(tensor)

    def _copy(self) -> None:
        try:
            for number, piece in enumerate(self.pieces):
                with self.turn:
                    if self.stopping:
                        return
                    self.claimed, skip = number, piece.key in self.skip
                if not skip:
                    (begin, stop), shard = self.source.span[piece.stored], self.source.shard[piece.stored]
                    where = f"{shard} ends inside tensor {piece.stored!r}"
                    _copy_range(self.inputs[shard], self.outputs[piece.shard], stop - begin, begin, piece.offset, where)
                with self.turn:
                    self.copied = number + 1
                    self.turn.notify_all()
        except BaseException as e:  # handed to the caller, raised there
            with self.turn:
                self.error = e
                self.turn.notify_all()

    def _wait(self, number: int) -> None:
        """Until the copier is past piece ``number``; its error, if it failed."""
        with self.turn:
            while self.copied <= number and self.error is None:
                self.turn.wait()
            if self.error is not None:
                raise self.error

    def _stop(self) -> None:
        if self.copier is not None:
            with self.turn:
                self.stopping = True
            self.copier.join()
            self.copier = None
        for fd in self.outputs:
            os.close(fd)
        self.outputs = []


_HEADER_BYTES = 100_000_000  # safetensors' own limit on a header's size
_AHEAD = 2  # merged tensors handed to the writer, not yet written, before the merge waits (1: 7% slower at 1.59 GiB)
_CHUNK = 1 << 24  # bytes a call copies: a stop request waits for one at most, and the fallback's buffer
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}  # then through a buffer


def _copy_range(src: int, dst: int, size: int, src_at: int, dst_at: int, where: str) -> None:
    """``size`` bytes of file ``src`` from ``src_at`` to file ``dst`` at ``dst_at``: in the kernel
    (``copy_file_range``) where the system and file systems allow it, else through a buffer. ``where`` says what
    ended, should ``src`` end first."""
    while size > 0:
        count, n = min(size, _CHUNK), -1
        if hasattr(os, "copy_file_range"):
            try:
                n = os.copy_file_range(src, dst, count, src_at, dst_at)
            except OSError as e:
                if e.errno not in _NO_KERNEL_COPY:
                    raise
        if n < 0:
            n = os.pwrite(dst, os.pread(src, count, src_at), dst_at)
        if n == 0:
            raise CheckpointError(f"--model: {where} (cut short after its header was read?)")
        start_writeback(dst, dst_at, n)
        size, src_at, dst_at = size - n, src_at + n, dst_at + n


_WRITE = 1 << 18  # bytes handed to one write: see _write_at


def _write_at(fd: int, data: torch.Tensor | memoryview, offset: int) -> None:
    """Write ``data`` at ``offset``, a quarter MiB a call: the page cache takes a large write in large folios (2 MiB
    blocks of memory), which a virtual machine whose host has taken its free memory back must fault in anew. Measured
    on a Firecracker VM (Linux 6.18): 1.4 GiB from memory in 0.3 s in 256 KiB writes, 3.3 s in 4 MiB ones."""
    view = memoryview(data.numpy()) if isinstance(data, torch.Tensor) else data
    while len(view):
        written = os.pwrite(fd, view[:_WRITE], offset)
        view, offset = view[written:], offset + written


def _weights_file(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".pt", ".pth")) or name == INDEX or name.endswith(".index.json")
