"""all-MiniLM-L6-v2 in a process of its own: built from weightd by the transformers
integration (``weightd SOURCE``) or by transformers from the directory
(``direct DIR``), and sentence-transformers on the snapshot / the directory; prints
sentence embeddings as hex and where the parameters' bytes live."""

from __future__ import annotations

import json
import sys

import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer

SENTENCES = ["weightd makes cold starts fast.", "A replica should not wait for weights.",
             "Zero copies: the same pages in every process."]


def embed(snapshot: str, model: torch.nn.Module) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(snapshot)
    batch = tok(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def mapped_files(model: torch.nn.Module) -> list[str]:
    """The file mapped at each parameter's first byte ("" where anonymous memory is),
    from /proc/self/maps."""
    maps = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            maps.append((lo, hi, parts[5].strip() if len(parts) > 5 else ""))
    return [next((path for lo, hi, path in maps if lo <= p.data_ptr() < hi), "")
            for p in model.parameters()]


def hex_of(t: torch.Tensor) -> str:
    return t.float().numpy().tobytes().hex()


def sentence_transformers(path: str) -> tuple[torch.Tensor, list[str]]:
    st = SentenceTransformer(path, device="cpu")
    return st.encode(SENTENCES, convert_to_tensor=True), mapped_files(st)


def main() -> None:
    mode, source = sys.argv[1], sys.argv[2]
    if mode == "weightd":
        from weightd_client.integrations.transformers import from_weightd

        model = from_weightd(source, fallback=False)
        weights = model.weightd_weights
        ptrs = {t.data_ptr() for t in weights.values()}
        emb = embed(weights.snapshot_path, model)
        st, st_files = sentence_transformers(weights.snapshot_path)
        print(json.dumps({
            "hex": hex_of(emb), "lease": weights.lease_id, "dtype": str(model.dtype),
            "params": sum(1 for _ in model.parameters()),
            "shared_params": sum(p.data_ptr() in ptrs for p in model.parameters()),
            "files": mapped_files(model), "st_hex": hex_of(st), "st_files": st_files}))
    else:
        model = AutoModel.from_pretrained(source).eval()
        emb = embed(source, model)
        st, _ = sentence_transformers(source)
        print(json.dumps({"hex": hex_of(emb), "st_hex": hex_of(st),
                          "max_diff_vs_sentence_transformers": float((st - emb).abs().max())}))


if __name__ == "__main__":
    main()
