"""Build all-MiniLM-L6-v2 from a snapshot's config on the meta device, take its weights
from weightd (or from the files), and print sentence embeddings as hex."""

from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoTokenizer

import weightd_client

SENTENCES = ["weightd makes cold starts fast.", "A replica should not wait for weights.",
             "Zero copies: the same pages in every process."]


def build(snapshot: str, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    config = AutoConfig.from_pretrained(snapshot)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    buffers = dict(model.named_buffers())
    state = model.state_dict()
    # older checkpoints carry buffers that newer code registers as non-persistent
    extra = {k: v for k, v in weights.items() if k not in state and k in buffers}
    weights = {k: v for k, v in weights.items() if k not in extra}
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    if unexpected:
        raise SystemExit(f"unexpected keys: {unexpected}")
    for name, value in extra.items():
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        owner.register_buffer(name.rsplit(".", 1)[-1], value, persistent=False)
    # non-persistent buffers are not in the checkpoint: materialize them on the CPU
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "position_ids":
                value = torch.arange(buf.shape[-1]).expand(buf.shape)
            elif leaf == "token_type_ids":
                value = torch.zeros(buf.shape, dtype=buf.dtype)
            else:
                raise SystemExit(f"buffer {name} has no value")
            owner.register_buffer(leaf, value.to(buf.dtype), persistent=False)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta or missing and any(not m.endswith(("position_ids", "token_type_ids"))
                                     for m in missing):
        raise SystemExit(f"parameters left on meta: {still_meta} missing: {missing}")
    return model.eval()


def embed(snapshot: str, model: torch.nn.Module) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(snapshot)
    batch = tok(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def main() -> None:
    mode, source = sys.argv[1], sys.argv[2]
    if mode == "weightd":
        with weightd_client.Client() as client, client.load(source, fallback=False) as w:
            model = build(w.snapshot_path, dict(w))
            shared = sum(1 for p in model.parameters()
                         if any(p.data_ptr() == t.data_ptr() for t in w.values()))
            emb = embed(w.snapshot_path, model)
            print(json.dumps({"hex": emb.numpy().tobytes().hex(), "lease": w.lease_id,
                              "shared_params": shared,
                              "params": sum(1 for _ in model.parameters())}))
    else:
        model = build(source, load_file(f"{source}/model.safetensors"))
        emb = embed(source, model)
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(source, device="cpu").encode(SENTENCES, convert_to_tensor=True)
        print(json.dumps({"hex": emb.numpy().tobytes().hex(),
                          "max_diff_vs_sentence_transformers": float((st - emb).abs().max())}))


if __name__ == "__main__":
    main()
