"""One benchmark round of one library, run inside that library's own virtual environment.

    python bench/peer_worker.py --lib {avec,steering-vectors,repeng} --spec SPEC.json --out OUT.json

The runner (bench/bench_peers.py) writes SPEC.json: the model directory, the contrast pairs,
token ids of the generation prompts and A/B questions (tokenized once by the runner so every
library sees the same tokens), the vector to steer with and the workloads. This script imports
only torch, transformers, safetensors and the library under test (never avec unless --lib
avec), times each workload with ``time.perf_counter``, records its peak RSS (VmHWM, reset
before each workload through /proc/self/clear_refs) and writes the timings, vectors and
outputs that the runner compares.

Each library is used the way its README shows, with its own steering mechanism:
steering-vectors ``train_steering_vector`` / ``SteeringVector.apply``; repeng
``ControlVector.train`` / ``ControlModel.set_control``; avec ``extract`` / ``steer`` /
``ab_sweep``. Generation is ``model.generate`` greedy with ``min_new_tokens`` =
``max_new_tokens`` (64) everywhere, so every library produces exactly the same number of tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

T_START = time.perf_counter()

import torch  # noqa: E402


def peak_rss_reset() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def peak_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> Any:
    peak_rss_reset()
    t0 = time.perf_counter()
    out = fn()
    results["timings"][name] = {"s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}
    print(f"  {name}: {results['timings'][name]['s']:.2f} s", file=sys.stderr, flush=True)
    return out


def load_vector_tensors(path: str) -> dict[int, torch.Tensor]:
    from safetensors.torch import load_file

    return {int(k.split(".")[1]): v.float() for k, v in load_file(path).items()}


def padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input ids and attention mask (what every library's generate gets)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def hf_generate(model: Any, rows: list[list[int]], pad_id: int, new_tokens: int) -> list[list[int]]:
    ids, mask = padded(rows, pad_id)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad_id)
    return out[:, ids.shape[1]:].tolist()


def ab_scores(logits: torch.Tensor, items: list[dict[str, Any]]) -> list[float]:
    probs = logits.float().softmax(-1)
    return [float(p[it["target_id"]] / (p[it["target_id"]] + p[it["other_id"]]))
            for p, it in zip(probs, items)]


# ---- adapters ------------------------------------------------------------------------------
class HFBase:
    """What the two peers share: a transformers model loaded from the converted directory."""

    name = ""

    def __init__(self, spec: dict[str, Any]) -> None:
        from transformers import AutoModelForCausalLM

        self.spec = spec
        model_dir = spec.get("model_dirs", {}).get(self.name, spec["model_dir"])
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32) \
            if _accepts_dtype() else AutoModelForCausalLM.from_pretrained(
                model_dir, torch_dtype=torch.float32)
        self.model.eval()
        self.tokenizer = _tokenizer(model_dir)
        self.pad_id = spec["pad_id"]

    def generate_plain(self, rows: list[list[int]], new_tokens: int) -> list[list[int]]:
        return hf_generate(self.model, rows, self.pad_id, new_tokens)

    def ab_forward(self, items: list[dict[str, Any]], batch: int,
                   steer: Callable[[torch.Tensor, list[int]], Any]) -> list[float]:
        """p(match) with the model's full prompt run per coefficient; ``steer(mask, suffix_lens)``
        returns the context manager that steers the batch."""
        scores: list[float] = []
        for i in range(0, len(items), batch):
            chunk = items[i:i + batch]
            ids, mask = padded([it["prefix"] + it["suffix"] for it in chunk], self.pad_id)
            # position ids as model.generate builds them (padding gets 1); repeng's padding mask
            # needs per-row position ids (it fails on the [1, T] default of transformers 5)
            pos = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)
            with torch.inference_mode(), steer(mask, [len(it["suffix"]) for it in chunk]):
                logits = self.model(input_ids=ids, attention_mask=mask,
                                    position_ids=pos).logits[:, -1]
            scores += ab_scores(logits, chunk)
        return scores


def _accepts_dtype() -> bool:
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


def _tokenizer(model_dir: str) -> Any:
    """AutoTokenizer; transformers 4.x cannot read the ``TokenizersBackend`` class name that
    transformers 5 writes, so fall back to the fast tokenizer built from tokenizer.json."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except ValueError:
        cfg = json.loads((Path(model_dir) / "tokenizer_config.json").read_text())
        special = {k: v for k, v in cfg.items()
                   if k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return PreTrainedTokenizerFast(tokenizer_file=str(Path(model_dir) / "tokenizer.json"),
                                       **special)


class SteeringVectorsLib(HFBase):
    name = "steering-vectors"

    def extract(self, pairs: list[list[str]], layers: list[int]) -> dict[int, torch.Tensor]:
        from steering_vectors import train_steering_vector

        vec = train_steering_vector(self.model, self.tokenizer, [tuple(p) for p in pairs],
                                    layers=layers, read_token_index=-1,
                                    batch_size=self.spec["extract_batch"])
        return {int(k): v.float() for k, v in vec.layer_activations.items()}

    def extract_pca(self, pairs: list[list[str]], layers: list[int]) -> dict[int, torch.Tensor]:
        from steering_vectors import pca_aggregator, train_steering_vector

        vec = train_steering_vector(self.model, self.tokenizer, [tuple(p) for p in pairs],
                                    layers=layers, read_token_index=-1,
                                    batch_size=self.spec["extract_batch"],
                                    aggregator=pca_aggregator())
        return {int(k): v.float() for k, v in vec.layer_activations.items()}

    def _vector(self, tensors: dict[int, torch.Tensor], layers: list[int]) -> Any:
        from steering_vectors import SteeringVector

        return SteeringVector({L: tensors[L] for L in layers}, "decoder_block")

    def generate(self, rows: list[list[int]], tensors: dict[int, torch.Tensor],
                 layers: list[int], coef: float, new_tokens: int) -> list[list[int]]:
        with self._vector(tensors, layers).apply(self.model, multiplier=coef):
            return hf_generate(self.model, rows, self.pad_id, new_tokens)

    def ab(self, items: list[dict[str, Any]], tensors: dict[int, torch.Tensor], layer: int,
           coefs: list[float]) -> list[list[float]]:
        vec = self._vector(tensors, [layer])

        def steer_suffix(coef: float) -> Callable[[torch.Tensor, list[int]], Any]:
            def make(mask: torch.Tensor, suffix_lens: list[int]) -> Any:
                where = torch.zeros(mask.shape, dtype=torch.float32)  # steer the suffix only,
                for r, n in enumerate(suffix_lens):                    # as CAA and avec do
                    where[r, mask.shape[1] - n:] = 1
                return vec.apply(self.model, multiplier=coef, min_token_index=None,  # type: ignore[arg-type]
                                 token_indices=where)
            return make

        return [self.ab_forward(items, self.spec["ab_batch"], steer_suffix(c)) for c in coefs]


class RepengLib(HFBase):
    name = "repeng"

    def extract(self, pairs: list[list[str]], layers: list[int]) -> dict[int, torch.Tensor]:
        from repeng import ControlVector, DatasetEntry

        data = [DatasetEntry(positive=p, negative=n) for p, n in pairs]
        vec = ControlVector.train(self.model, self.tokenizer, data, hidden_layers=layers,
                                  batch_size=self.spec["extract_batch"])
        self.last_vector = vec
        return {int(k): torch.from_numpy(v).float() for k, v in vec.directions.items()}

    def _control(self, tensors: dict[int, torch.Tensor], layers: list[int], coef: float) -> Any:
        from repeng import ControlModel, ControlVector

        cm = ControlModel(self.model, layers)
        cm.set_control(ControlVector(self.model.config.model_type,
                                     {L: tensors[L].numpy() for L in layers}), coef)
        return cm

    def generate(self, rows: list[list[int]], tensors: dict[int, torch.Tensor],
                 layers: list[int], coef: float, new_tokens: int) -> list[list[int]]:
        cm = self._control(tensors, layers, coef)
        try:
            return hf_generate(cm, rows, self.pad_id, new_tokens)
        finally:
            cm.unwrap()

    def ab(self, items: list[dict[str, Any]], tensors: dict[int, torch.Tensor], layer: int,
           coefs: list[float]) -> list[list[float]]:
        import contextlib

        out = []
        for coef in coefs:  # repeng steers every (non-padding) position: it has no position
            cm = self._control(tensors, [layer], coef)  # selection
            try:
                out.append(self.ab_forward(items, self.spec["ab_batch"],
                                           lambda _m, _s: contextlib.nullcontext()))
            finally:
                cm.unwrap()
        return out

    def export_gguf(self, tensors: dict[int, torch.Tensor], path: str) -> None:
        self.last_vector.export_gguf(path)  # the vector ControlVector.train returned


class AvecLib:
    name = "avec"

    def __init__(self, spec: dict[str, Any]) -> None:
        import avec

        self.spec = spec
        self.avec = avec
        self.model = avec.load_model()  # the packaged default model, from avec's cache

    def _pairs(self, pairs: list[list[str]]) -> list[Any]:
        return [self.avec.ContrastPair(p, n) for p, n in pairs]

    def extract(self, pairs: list[list[str]], layers: list[int]) -> dict[int, torch.Tensor]:
        vec = self.avec.extract(self.model, self._pairs(pairs), layers)
        return dict(vec.directions)

    def extract_pca(self, pairs: list[list[str]], layers: list[int]) -> dict[int, torch.Tensor]:
        vec = self.avec.extract(self.model, self._pairs(pairs), layers, method="pca")
        return dict(vec.directions)

    def _vector(self, tensors: dict[int, torch.Tensor], layers: list[int]) -> Any:
        return self.avec.SteeringVector({L: tensors[L] for L in layers})

    def generate_plain(self, rows: list[list[int]], new_tokens: int) -> list[list[int]]:
        from avec.generation.hf import generate_ids

        return generate_ids(self.model, rows, new_tokens, min_new_tokens=new_tokens)

    def generate(self, rows: list[list[int]], tensors: dict[int, torch.Tensor],
                 layers: list[int], coef: float | list[float], new_tokens: int
                 ) -> list[list[int]]:
        from avec.generation.hf import generate_ids

        with self.avec.steer(self.model, self._vector(tensors, layers), coef=coef):
            return generate_ids(self.model, rows, new_tokens, min_new_tokens=new_tokens)

    def ab(self, items: list[dict[str, Any]], tensors: dict[int, torch.Tensor], layer: int,
           coefs: list[float]) -> list[list[float]]:
        from avec.evaluate.ab import ABItem, ab_sweep

        ab_items = [ABItem(it["question"], it["target"], it["other"]) for it in items]
        scores = ab_sweep(self.model, ab_items, self._vector(tensors, [layer]), [layer], coefs,
                          batch_size=self.spec["ab_batch"])
        return scores[0].tolist()

    def import_gguf(self, path: str) -> dict[int, torch.Tensor]:
        return dict(self.avec.load_vector(path, self.model).directions)


LIBS = {"avec": AvecLib, "steering-vectors": SteeringVectorsLib, "repeng": RepengLib}


def gguf_parity(spec: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """avec side of the GGUF check: import repeng's exported file, steer with it."""
    torch.set_num_threads(spec["threads"])
    lib = AvecLib(spec)
    imported = lib.import_gguf(str(out_dir / "repeng_export.gguf"))
    gen = spec["generate"]
    return {"lib": "avec", "layers": sorted(imported), "outputs": {"gguf_steered": lib.generate(
        gen["prompts"], imported, sorted(imported), spec["gguf_coef"], gen["new_tokens"])}}


def run(lib_name: str, spec: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    results: dict[str, Any] = {"lib": lib_name, "timings": {}, "outputs": {}}
    lib = measure(results, "load_warm", lambda: LIBS[lib_name](spec))
    results["timings"]["load_warm"]["s"] = time.perf_counter() - T_START  # incl. imports
    results["versions"] = _versions(lib_name)
    pairs = spec["pairs"]
    vec = load_vector_tensors(spec["vector_file"])
    gen = spec["generate"]
    prompts = gen["prompts"]
    n_new = gen["new_tokens"]
    all_layers = sorted(vec)
    one = [gen["layer"]]

    for w in spec["extract"]:  # vector extraction
        name = f"extract_{w['pairs']}_{len(w['layers'])}L"
        got = measure(results, name, lambda: lib.extract(pairs[:w["pairs"]], w["layers"]))
        if w.get("save"):
            _save(got, out_dir / f"{lib_name}_{name}.safetensors")
            if hasattr(lib, "extract_pca"):  # parity of the PCA methods (not timed)
                _save(lib.extract_pca(pairs[:w["pairs"]], w["layers"]),
                      out_dir / f"{lib_name}_pca_{w['pairs']}_{len(w['layers'])}L.safetensors")
            if hasattr(lib, "export_gguf"):  # repeng's own vector, exported for llama.cpp
                lib.export_gguf(got, str(out_dir / "repeng_export.gguf"))
                results["outputs"]["gguf_steered"] = lib.generate(
                    spec["generate"]["prompts"], got, sorted(got), spec["gguf_coef"],
                    spec["generate"]["new_tokens"])

    outs = results["outputs"]  # greedy generation, 64 new tokens
    outs["gen_b1_plain"] = measure(results, "gen_b1_plain",
                                   lambda: lib.generate_plain(prompts[:1], n_new))
    outs["gen_b1_1L"] = measure(results, "gen_b1_1L", lambda: lib.generate(
        prompts[:1], vec, one, gen["coef_one"], n_new))
    outs["gen_b1_allL"] = measure(results, "gen_b1_allL", lambda: lib.generate(
        prompts[:1], vec, all_layers, gen["coef_all"], n_new))
    outs["gen_b8_plain"] = measure(results, "gen_b8_plain",
                                   lambda: lib.generate_plain(prompts, n_new))
    outs["gen_b8_1L"] = measure(results, "gen_b8_1L", lambda: lib.generate(
        prompts, vec, one, gen["coef_one"], n_new))
    outs["gen_b8_allL"] = measure(results, "gen_b8_allL", lambda: lib.generate(
        prompts, vec, all_layers, gen["coef_all"], n_new))
    row_coefs = gen["row_coefs"]
    if lib_name == "avec":  # one batch, one coefficient per row
        outs["gen_b8_rows"] = measure(results, "gen_b8_rows", lambda: lib.generate(
            prompts, vec, one, row_coefs, n_new))
    else:  # a peer applies one coefficient to a whole batch: one generate call per row
        outs["gen_b8_rows"] = measure(results, "gen_b8_rows", lambda: [
            lib.generate([p], vec, one, c, n_new)[0] for p, c in zip(prompts, row_coefs)])

    ab = spec["ab"]  # 9-coefficient sweep of the A/B metric, and one coefficient
    outs["ab_1"] = measure(results, "ab_1coef", lambda: lib.ab(ab["items"], vec, ab["layer"],
                                                               ab["coefs"][-1:]))
    outs["ab_9"] = measure(results, "ab_9coefs", lambda: lib.ab(ab["items"], vec, ab["layer"],
                                                                ab["coefs"]))

    return results


def _save(tensors: dict[int, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({f"layer.{k}": v.float().contiguous() for k, v in tensors.items()}, str(path))


def _versions(lib_name: str) -> dict[str, str]:
    from importlib.metadata import version

    names = ["torch", "transformers", "numpy"] + ([lib_name] if lib_name != "avec" else ["avec"])
    return {n: version(n) for n in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", choices=sorted(LIBS), required=True)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--task", choices=["bench", "gguf-parity"], default="bench")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    spec = json.loads(Path(args.spec).read_text())
    out = Path(args.out)
    results = gguf_parity(spec, out.parent) if args.task == "gguf-parity" else \
        run(args.lib, spec, out.parent)
    out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
