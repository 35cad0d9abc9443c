"""`medclip convert SRC OUT`: any loadable model, written in open_clip's hub format."""

from __future__ import annotations

from pathlib import Path

SRC_HELP = ("NAME=PATH for a named pretrained model and its downloaded file or snapshot (e.g. "
            "unimed-clip-b16=unimed-clip-vit-b16.pt), a NAME alone to fetch it, or anything medclip.load "
            "takes (an open_clip hub directory, a medclip training checkpoint)")


def run(args) -> int:
    from medclip.models.export import BUNDLED, read_hub_config, save
    from medclip.models.loading import load_spec
    from medclip.outputs import claim_output_dir

    source = args.src.partition("=")[2] if "=" in args.src else args.src.removeprefix("local-dir:")
    claim_output_dir(args.out, "convert", [source if Path(source).exists() else None, args.hf_text_dir], args.force)
    encoder = load_spec(args.src, device="cpu", hf_text_dir=args.hf_text_dir)
    out = save(encoder, args.out)
    model_cfg = read_hub_config(out)["model_cfg"]
    names = [model_cfg.get("text_cfg", {}).get("hf_model_name"), model_cfg.get("vision_cfg", {}).get("timm_model_name")]
    relative = [n for n in names if n and (n == BUNDLED or n.startswith("local-dir:") and not Path(n[10:]).is_absolute())]
    files = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()))
    print(f"wrote {out} ({files})")
    print(f"medclip:   medclip.load({str(out)!r})")
    where = f"from inside {out} (its towers are named relative to it): " if relative else ""
    target = "." if relative else str(out)
    print(f"open_clip: {where}open_clip.create_model_and_transforms('local-dir:{target}'), "
          f"open_clip.get_tokenizer('local-dir:{target}')")
    if encoder.heads is not None:
        print("PC-Align heads: medclip_heads.safetensors (medclip loads them; open_clip ignores them)")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="write a model (any family medclip loads) in open_clip's hub format")
    parser.add_argument("src", help=SRC_HELP)
    parser.add_argument("out", help="output directory: new, empty or an earlier convert output, not the source")
    parser.add_argument("--force", action="store_true",
                        help="write into OUT even when it is not empty or overlaps the source")
    parser.add_argument("--hf-text-dir", default=None, help="local HF text tower directory (config + tokenizer)")
    parser.set_defaults(func=run)
