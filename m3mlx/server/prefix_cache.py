"""A prefix cache for the server: a radix tree over token ids whose nodes hold the K/V and MSA
index-key caches of their tokens, bounded in memory (LRU) and kept on disk across restarts.

Each node covers a run of tokens (its edge) and stores, per layer, the cache slices of exactly
those positions; a path from the root is a prompt prefix. A lookup walks the tree with the
request's tokens and returns how many of them are cached (a partial edge counts). Restoring
concatenates the slices along the path into a fresh per-layer cache. Inserting a served
conversation adds only what the tree does not hold yet, splitting an edge where the new
conversation diverges, so prompts that share a prefix (a system prompt, tools, earlier turns)
share its storage.

On disk (`directory`), every node is one safetensors file named by a hash of the tokens from
the root to its end, with its edge tokens and its parent in the metadata; files are written
atomically. A restarted server reads the headers only, rebuilds the tree, and loads a node's
arrays when a request needs them. The directory is per model (a fingerprint of the weights and
cache layout), so caches of different models never mix.
"""

import hashlib
import json
import os
import struct
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from ..cache import STATE_AXES, LayerCache
from ..chat import common_prefix_length
from ..checks import parse_json

# The position axis of each array a LayerCache holds (see LayerCache.state).
FORMAT = "m3mlx-prefix-cache/1"


def _slice(array: mx.array, name: str, start: int, stop: int) -> mx.array:
    index = [slice(None)] * array.ndim
    index[STATE_AXES[name]] = slice(start, stop)
    return array[tuple(index)]


def _own(array: mx.array) -> mx.array:
    """A copy that shares no buffer with the live cache (a view would pin it and make every
    in-place cache update copy the whole buffer)."""
    return mx.array(array)


def _key(tokens: Sequence[int]) -> str:
    return hashlib.sha1(np.asarray(tokens, dtype=np.int64).tobytes()).hexdigest()


class _Node:
    __slots__ = ("tokens", "children", "parent", "state", "nbytes", "used", "key", "on_disk")

    def __init__(self, tokens: Tuple[int, ...], parent: Optional["_Node"], key: str):
        self.tokens = tokens
        self.children: Dict[int, "_Node"] = {}
        self.parent = parent
        self.state: Optional[List[Dict[str, mx.array]]] = None  # per layer, None: on disk only
        self.nbytes = 0  # of the state, when in memory
        self.used = time.monotonic()
        self.key = key
        self.on_disk = False


class PrefixCache:
    def __init__(self, layer_meta: List[dict], max_bytes: int, directory=None,
                 max_disk_bytes: Optional[int] = None, log=None):
        self.layer_meta = [{k: v for k, v in m.items() if k != "offset"} for m in layer_meta]
        self.max_bytes = max_bytes
        self.max_disk_bytes = max_disk_bytes
        self.root = _Node((), None, _key(()))
        self.memory_bytes = 0
        self.disk_bytes = 0
        self.directory = Path(directory) if directory else None
        self.log = log or (lambda line: None)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._load_index()

    # -- lookup --------------------------------------------------------------------------------

    def _walk(self, ids: Sequence[int]) -> Iterator[Tuple[_Node, int]]:
        """(node, tokens of its edge matched) along the path of `ids`."""
        node, pos = self.root, 0
        while pos < len(ids):
            child = node.children.get(ids[pos])
            if child is None:
                return
            n = common_prefix_length(child.tokens, ids[pos:])
            yield child, n
            if n < len(child.tokens):
                return
            node, pos = child, pos + n

    def match(self, ids: Sequence[int]) -> int:
        """How many leading tokens of `ids` the cache holds."""
        return sum(n for _, n in self._walk(ids))

    def restore(self, ids: Sequence[int], n: int) -> List[LayerCache]:
        """Per-layer caches holding the first n tokens of `ids` (n <= match(ids))."""
        pieces: List[Tuple[_Node, int]] = []
        total = 0
        now = time.monotonic()
        for node, matched in self._walk(ids):
            take = min(matched, n - total)
            if take <= 0:
                break
            node.used = now
            pieces.append((node, take))
            total += take
        if total < n:
            raise ValueError(f"the prefix cache holds {total} of the {n} tokens asked for")
        states = [self._state(node) for node, _ in pieces]
        caches = []
        for layer, meta in enumerate(self.layer_meta):
            names = list(states[0][layer]) if pieces else []
            merged = {}
            for name in names:
                parts = [_slice(state[layer][name], name, 0, take)
                         for state, (_, take) in zip(states, pieces)]
                merged[name] = mx.concatenate(parts, axis=STATE_AXES[name]) \
                    if len(parts) > 1 else parts[0]
            caches.append(LayerCache.from_state(merged, {**meta, "offset": n}))
        mx.eval([c.state for c in caches])
        self._evict()
        return caches

    def _state(self, node: _Node) -> List[Dict[str, mx.array]]:
        if node.state is None:
            arrays = mx.load(str(self._file(node)))
            node.state = [{name: arrays[f"{i}.{name}"] for name in STATE_AXES
                           if f"{i}.{name}" in arrays} for i in range(len(self.layer_meta))]
            node.nbytes = sum(a.nbytes for layer in node.state for a in layer.values())
            self.memory_bytes += node.nbytes
        return node.state

    # -- insert --------------------------------------------------------------------------------

    def insert(self, ids: Sequence[int], cache: List[LayerCache]):
        """Store the cache of `ids` (the cache holds at least its first len(ids) positions)."""
        n = min([len(ids)] + [c.offset for c in cache])
        if n == 0 or self.max_bytes <= 0:
            return
        node, pos = self.root, 0
        now = time.monotonic()
        written = []
        while pos < n:
            child = node.children.get(ids[pos])
            if child is None:
                break
            matched = common_prefix_length(child.tokens, ids[pos:n])
            child.used = now
            if matched < len(child.tokens):
                child = self._split(child, matched)
                written.append(child)
            node, pos = child, pos + matched
        if pos < n:
            states = [c.state for c in cache]
            leaf = _Node(tuple(ids[pos:n]), node, _key(ids[:n]))
            leaf.state = [{name: _own(_slice(a, name, pos, n)) for name, a in layer.items()}
                          for layer in states]
            mx.eval([list(layer.values()) for layer in leaf.state])
            leaf.nbytes = sum(a.nbytes for layer in leaf.state for a in layer.values())
            self.memory_bytes += leaf.nbytes
            node.children[ids[pos]] = leaf
            written.append(leaf)
        for item in written:
            self._write(item)
        self._evict()

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut `node`'s edge after `at` tokens; returns the new upper node."""
        parent = node.parent
        path = self._path(parent) + list(node.tokens[:at])
        upper = _Node(node.tokens[:at], parent, _key(path))
        upper.used = node.used
        state = self._state(node)
        upper.state = [{name: _own(_slice(a, name, 0, at)) for name, a in layer.items()}
                       for layer in state]
        lower = [{name: _own(_slice(a, name, at, len(node.tokens))) for name, a in layer.items()}
                 for layer in state]
        mx.eval([list(layer.values()) for layer in upper.state + lower])
        self.memory_bytes -= node.nbytes
        node.state = lower
        node.nbytes = sum(a.nbytes for layer in lower for a in layer.values())
        upper.nbytes = sum(a.nbytes for layer in upper.state for a in layer.values())
        self.memory_bytes += node.nbytes + upper.nbytes
        parent.children[node.tokens[0]] = upper
        node.tokens = node.tokens[at:]
        node.parent = upper
        upper.children[node.tokens[0]] = node
        if node.on_disk:
            self._write(node)  # same key (same end), new edge and parent
        return upper

    def _path(self, node: _Node) -> List[int]:
        edges = []
        while node is not None and node is not self.root:
            edges.append(node.tokens)
            node = node.parent
        return [t for edge in reversed(edges) for t in edge]

    # -- bounds --------------------------------------------------------------------------------

    def _nodes(self) -> Iterator[_Node]:
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _evict(self):
        """Drop least recently used states from memory (nodes on disk stay in the tree)."""
        while self.memory_bytes > self.max_bytes:
            candidates = [n for n in self._nodes() if n.state is not None and
                          (n.on_disk or not n.children)]
            if not candidates:
                return
            victim = min(candidates, key=lambda n: n.used)
            self.memory_bytes -= victim.nbytes
            victim.state, victim.nbytes = None, 0
            if not victim.on_disk:
                self._remove(victim)
        if self.max_disk_bytes is not None:
            while self.disk_bytes > self.max_disk_bytes:
                leaves = [n for n in self._nodes() if n.on_disk and not n.children]
                if not leaves:
                    return
                victim = min(leaves, key=lambda n: n.used)
                self._unlink(victim)
                if victim.state is None:
                    self._remove(victim)

    def _remove(self, node: _Node):
        del node.parent.children[node.tokens[0]]
        if node.on_disk:
            self._unlink(node)

    # -- disk ----------------------------------------------------------------------------------

    def _file(self, node: _Node) -> Path:
        return self.directory / f"{node.key}.safetensors"

    def _write(self, node: _Node):
        if self.directory is None:
            return
        file = self._file(node)
        old = file.stat().st_size if node.on_disk and file.exists() else 0
        arrays = {f"{i}.{name}": a for i, layer in enumerate(node.state) for name, a in
                  layer.items()}
        parent = "" if node.parent is self.root else node.parent.key
        meta = {"m3mlx_prefix": json.dumps({"format": FORMAT, "parent": parent,
                                            "tokens": list(node.tokens)})}
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp.safetensors")
        try:
            mx.save_safetensors(str(tmp), arrays, metadata=meta)
            os.replace(tmp, file)
        except OSError as e:  # a full or read-only disk: the cache stays in memory
            tmp.unlink(missing_ok=True)
            self.log(f"prefix cache: could not write {file} ({e.strerror or e}); "
                     "continuing without it on disk")
            return
        node.on_disk = True
        self.disk_bytes += file.stat().st_size - old

    def _unlink(self, node: _Node):
        file = self._file(node)
        try:
            self.disk_bytes -= file.stat().st_size
            file.unlink()
        except OSError:
            pass
        node.on_disk = False

    def _load_index(self):
        """Rebuild the tree from the files' headers (arrays load when first needed)."""
        entries = {}
        for file in self.directory.glob("*.safetensors"):
            if file.name.startswith("."):
                file.unlink(missing_ok=True)  # a write that never finished
                continue
            meta = _read_metadata(file)
            if meta is None or meta.get("format") != FORMAT or \
                    not isinstance(meta.get("tokens"), list) or not meta["tokens"]:
                self.log(f"prefix cache: ignoring {file.name} (not a cache node)")
                continue
            entries[file.stem] = (meta, file.stat())
        nodes: Dict[str, _Node] = {}

        def build(key: str) -> Optional[_Node]:
            if key in nodes:
                return nodes[key]
            if key not in entries:
                return None
            meta, stat = entries.pop(key)
            parent = self.root if not meta["parent"] else build(meta["parent"])
            if parent is None or meta["tokens"][0] in parent.children:
                return None
            node = _Node(tuple(meta["tokens"]), parent, key)
            node.on_disk, node.used = True, stat.st_mtime - time.time() + time.monotonic()
            parent.children[node.tokens[0]] = node
            self.disk_bytes += stat.st_size
            nodes[key] = node
            return node

        for key in list(entries):
            if key in entries and build(key) is None:
                (self.directory / f"{key}.safetensors").unlink(missing_ok=True)  # orphan
        if nodes:
            tokens = max((len(self._path(n)) for n in nodes.values()), default=0)
            self.log(f"prefix cache: {len(nodes)} nodes on disk in {self.directory} "
                     f"({self.disk_bytes / 1e6:.1f} MB, longest prefix {tokens:,} tokens)")


def _read_metadata(file: Path) -> Optional[dict]:
    """The m3mlx metadata of a safetensors file, from its header alone."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 1 << 26:
                return None
            header = parse_json(f.read(n))
        meta = parse_json(header.get("__metadata__", {}).get("m3mlx_prefix", "null"))
    except (OSError, struct.error, ValueError, AttributeError):
        return None
    return meta if isinstance(meta, dict) else None


def fingerprint(model_dir: Path, parts: Sequence[object]) -> str:
    """An id for a model's cache: its weight files (name, size, mtime) and the cache layout."""
    files = sorted(p for p in Path(model_dir).glob("*.safetensors"))
    stats = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files]
    text = json.dumps([str(Path(model_dir).resolve()), stats, [str(p) for p in parts]])
    return hashlib.sha1(text.encode()).hexdigest()[:16]
