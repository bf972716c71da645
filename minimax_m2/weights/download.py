"""Fetching a checkpoint from the Hugging Face Hub: only the shard files that hold the tensors needed.

config.json, the safetensors index and the tokenizer files come first; from the index, the shards
holding the tensors an expert selection needs are worked out, announced (files and bytes), and
downloaded into the HF cache with the hub's own progress bars. Returns the cache snapshot directory,
which `Checkpoint` reads like any checkpoint directory.
"""

from pathlib import Path

from minimax_m2.config import MiniMaxM2Config
from minimax_m2.experts import parse_experts, select_experts
from minimax_m2.weights.checkpoint import INDEX_FILE, SINGLE_FILE, needed_keys, read_weight_map
from minimax_m2.weights.prepare import CARRIED_FILES


def _hub():
    try:
        import huggingface_hub
    except ImportError as err:
        raise ImportError("--repo-id needs huggingface-hub: pip install huggingface-hub") from err
    return huggingface_hub


def fetch(repo_id: str, revision: str | None, experts: str | None) -> tuple[Path, str]:
    """Download what the `--experts` spec (None: all) needs -> (snapshot directory, commit hash)."""
    hub = _hub()
    from huggingface_hub.errors import EntryNotFoundError

    config_path = Path(hub.hf_hub_download(repo_id, "config.json", revision=revision))
    root = config_path.parent
    for name in CARRIED_FILES:
        try:
            hub.hf_hub_download(repo_id, name, revision=revision)
        except EntryNotFoundError:
            pass
    config = MiniMaxM2Config.from_pretrained(root)
    try:
        index_path = Path(hub.hf_hub_download(repo_id, INDEX_FILE, revision=revision))
    except EntryNotFoundError:
        shards = [SINGLE_FILE]
        every = shards
    else:
        weight_map = read_weight_map(index_path)
        keep = needed_keys(weight_map, config, select_experts(config, parse_experts(experts, config.num_local_experts)))
        shards = sorted({weight_map[k] for k in keep})
        every = sorted(set(weight_map.values()))
    info = hub.HfApi().get_paths_info(repo_id, shards, revision=revision)
    size = sum(getattr(f, "size", 0) or 0 for f in info)
    print(f"downloading {len(shards)} of {len(every)} shard files, {size / 1e9:.2f} GB, from {repo_id}")
    for name in shards:
        hub.hf_hub_download(repo_id, name, revision=revision)
    return root, root.name
