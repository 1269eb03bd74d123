"""`gpt2 export`: write a model (a training run, a Hugging Face folder or a hub name) as one GGUF file for
llama.cpp, or as a Hugging Face folder for `transformers`.

    gpt2 export --model RUN_DIR --format gguf --outtype q8_0 --out model.gguf
    gpt2 export --model RUN_DIR --format hf --out exported/

The GGUF writer is `gpt2.export.gguf.write_gguf`, the folder's `gpt2.export.save_model_folder` (what training
writes as a run's `model/`, tokenizer files included).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gpt2.checkpoint import load_model
from gpt2.commands import Command
from gpt2.config import arg
from gpt2.errors import UserError, note
from gpt2.export import save_model_folder
from gpt2.io import not_a_folder

FORMATS = ["gguf", "hf"]
OUTTYPES = ["f32", "f16", "q8_0"]  # gpt2.export.gguf.OUTTYPES' keys (that module is imported only for gguf)


@dataclass
class ExportConfig:
    model: str = arg("gpt2", help="training run directory, Hugging Face checkpoint directory or hub name")
    format: str = arg("gguf", help="gguf: one file for llama.cpp (and ollama, LM Studio, llama-cpp-python); "
                                   "hf: a Hugging Face folder (config, safetensors weights, tokenizer files)",
                      choices=FORMATS)
    outtype: str | None = arg(None, help="gguf only: the type of the 2-D weights, f32, f16 or q8_0 (8-bit blocks "
                                         "of 32; about half the size of f16); LayerNorms, biases and the position "
                                         "embedding stay f32 (default: f16)",
                              choices=OUTTYPES)
    out: str | None = arg(None, help="the .gguf file to write (--format gguf) or the folder (--format hf)",
                          metavar="PATH")

    def validate(self) -> None:
        if not self.out:
            example = "model.gguf" if self.format == "gguf" else "DIR"
            raise UserError(f"give the output path: gpt2 export --model M --format {self.format} --out {example}")
        if self.format == "hf" and self.outtype is not None:
            raise UserError(f"--outtype {self.outtype} applies to --format gguf only: a Hugging Face folder keeps "
                            "the model's float32 weights")
        if self.format == "hf" and Path(self.out).is_file():
            raise UserError(f"--out {self.out} is a file: --format hf writes a folder")
        error = not_a_folder(Path(self.out) if self.format == "hf" else Path(self.out).parent)
        if error is not None:
            raise UserError(f"--out {self.out}: {error}")


def run(cfg: ExportConfig) -> Path:
    cfg.validate()
    model = load_model(cfg.model, "cpu").eval()
    out = Path(cfg.out)
    if cfg.format == "hf":
        save_model_folder(model, out)
    else:
        # imports the gguf package (a tenth of a second): every other command would pay it at start-up
        from gpt2.export.gguf import write_gguf

        write_gguf(model, out, cfg.outtype or "f16", name=Path(cfg.model).name or "gpt2", source=cfg.model)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file()) if out.is_dir() else out.stat().st_size
    note(f"wrote {out} ({size / 1e6:.1f} MB, {cfg.format}"
         f"{'' if cfg.format == 'hf' else ' ' + (cfg.outtype or 'f16')}) from {cfg.model}")
    return out


COMMAND = Command("export", "write a model as a GGUF file for llama.cpp or as a Hugging Face folder",
                  ExportConfig, run)
