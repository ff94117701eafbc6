"""MoE-LLaVA's released recipes at real size: CLIP-L/14-336 (or SigLIP-so400m) + StableLM-2-1.6B,
Qwen1.5-1.8B or Phi-2, MoE-Tuning stages 1 -> 2 -> 3 as the paper trains them.

Train (given the data and the Hugging Face weights; nothing is downloaded):
    python -m moe_llava_jax.train --config=configs/moe_llava.py:llm=stablelm,data=/data/moe_llava \\
        --config.model.llm_from=/weights/stablelm-2-1_6b \\
        --config.model.vision_from=/weights/clip-vit-large-patch14-336
Compile ahead of time for a TPU slice, shapes only (no weights, no data, no TPU):
    JAX_PLATFORMS=cpu python -m moe_llava_jax.aot --config=configs/moe_llava.py:llm=stablelm \\
        --topology=v5p-8

Fine-tune a release (e.g. continue stage 3 on one's own data; README, "Fine-tuning a
released model"):
    python -m moe_llava_jax.train --config=configs/moe_llava.py:llm=stablelm,data=/data/mine,\
release=/weights/MoE-LLaVA-StableLM-1.6B-4e,run_stages=stage3 \
        --config.model.vision_from=/weights/clip-vit-large-patch14-336

Args: llm = stablelm | qwen | phi; tower = clip | siglip; release = a MoE-LLaVA release
directory the first stage of run_stages starts from (`model.init_from_hf`; its
tokenizer.json unless `data.tokenizer` says otherwise); data = directory holding the
stages' LLaVA-format files (`stage1.json`: LLaVA-558k captions, `stage2.json`: the ~964k
MoE-LLaVA instruction mix, `stage3.json`: LLaVA-1.5 mix-665k) with the image paths relative
to it; run_stages (default all three). Set `data.tokenizer` to the LLM's `tokenizer.json`.
POPE on COCO is scored from answer files (`predict`, then `evaluate.benchmark_answers`),
not after a stage.

The paper's recipe (8 x A100, one epoch per stage): AdamW, cosine with 3% warmup, no weight
decay, 2,048 text tokens + 576 image tokens = 2,624 positions, global batch 256 / 128 / 128,
learning rate 1e-3 / 2e-5 / 2e-5, top-2 of 4 experts in every other layer, capacity factor
1.5, balance loss 0.01. Steps are one epoch of the published dataset sizes. bf16 compute,
frozen weights stored in bf16, `remat=unit`, the experts' backward in 4 pieces, FSDP over
every device (`mesh.fsdp=-1`); `grad_accum_steps` keeps 16 examples per device per
micro-batch on a v5p-8 (4 chips), what the AOT report measured to fit (README, "At real
size").
"""

import math
import os

from configs import common, models
from moe_llava_jax import build
from moe_llava_jax.models.vision import VisionConfig

LLMS = {  # arg -> (preset, chat template, EOS token)
    "stablelm": ("stablelm-2-1.6b", "stablelm", "<|endoftext|>"),
    "qwen": ("qwen1.5-1.8b", "qwen", "<|endoftext|>"),
    "phi": ("phi2-2.7b", "phi", "<|endoftext|>"),
}
TOWERS = {"clip": ("clip-l-14-336", "clip"), "siglip": ("siglip-so400m-14-384", "siglip")}

# stage -> (published examples, global batch, learning rate)
RECIPE = {"stage1": (558_128, 256, 1e-3), "stage2": (964_000, 128, 2e-5), "stage3": (665_298, 128, 2e-5)}
TEXT_TOKENS, DEVICES, PER_DEVICE_MICRO_BATCH = 2048, 4, 16


def get_config(arg: str | None = None):
    args = common.parse_arg(
        arg, llm="stablelm", tower="clip", data="", release="", run_stages="stage1,stage2,stage3"
    )
    if args.llm not in LLMS or args.tower not in TOWERS:
        raise ValueError(
            f"config arguments llm={args.llm!r} / tower={args.tower!r}: known llm "
            f"{sorted(LLMS)}, tower {sorted(TOWERS)}"
        )
    llm, template, eos = LLMS[args.llm]
    tower, processor = TOWERS[args.tower]
    config = common.moe_tuning_config(args.run_stages, "")
    config.workdir = f"workdir/moe_llava_{args.llm}_{args.tower}"
    config.model.decoder = models.decoder(llm)
    config.model.vision = models.vision(tower)
    # bf16 compute; frozen weights stored in bf16 (the compute rounds them so anyway); each
    # scanned (MoE, dense) unit rematerialised as a whole; the experts' backward in 4 slices
    # of their mlp axis (README, "At real size").
    config.model.update(
        image_processor=processor, dtype="bfloat16", remat="unit", frozen_param_dtype="bfloat16"
    )
    config.model.moe.backward_pieces = 4
    config.model.moe.router_init = "torch"  # the original's fresh gate: PyTorch's Linear init
    config.model.drop_lm_head_bias = args.llm == "phi"  # LLaVA-Phi's, from stage 1 on
    config.mesh = {"data": 1, "fsdp": -1, "expert": 1, "tensor": 1}
    config.data.update(image_root=args.data, eos_token=eos)
    positions = TEXT_TOKENS + VisionConfig(**config.model.vision).num_image_tokens
    for name, (examples, batch, lr) in RECIPE.items():
        config[name].update(
            data=os.path.join(args.data, f"{name}.json"),
            template="plain" if name == "stage1" else template,
            lr=lr,
            batch_size=batch,
            num_steps=math.ceil(examples / batch),
            max_length=positions,
            grad_accum_steps=max(1, batch // (DEVICES * PER_DEVICE_MICRO_BATCH)),
            # Supervised positions per example the LM head runs on (captions are short; a
            # batch with a longer answer computes every position, exactly, and logs it).
            loss_budget=128 if name == "stage1" else 1024,
            checkpoint_every=500,
            log_every=10,
        )
    config.pope.template = template
    if args.release:
        config.model.init_from_hf = args.release
        config.data.tokenizer = os.path.join(args.release, "tokenizer.json")
        config[build.stage_names(config)[0]].init_from = ""
    return config
