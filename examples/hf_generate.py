"""Generate with an HF transformers MoE model through each experts implementation.

Builds a random-weight Qwen3-MoE (or loads a local checkpoint directory with --model), then for
each implementation: the logits of one prompt (largest difference to the first implementation
listed) and greedy generation speed in tokens/s.

    python examples/hf_generate.py                          # random Qwen3-MoE on the GPU
    python examples/hf_generate.py --model /path/to/Qwen3-30B-A3B --new-tokens 64
    python examples/hf_generate.py --device cpu --layers 1 --hidden 64 --experts 4   # tiny, CPU

The three lines that matter:

    from moe_kernels.integrations.transformers import register
    register()
    model.set_experts_implementation("moe_kernels")  # or "moe_kernels_fp8"
"""

import argparse
import time

import torch
import transformers

from moe_kernels.integrations.transformers import register


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a local checkpoint directory (default: a random Qwen3-MoE)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--implementations", default="eager,grouped_mm,moe_kernels,moe_kernels_fp8",
                   help="comma-separated experts implementations; the first is the logits reference")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    # The random model (ignored with --model): a scaled-down Qwen3-30B-A3B by default.
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--moe-intermediate", type=int, default=768)
    return p.parse_args()


def random_qwen3_moe(args, dtype):
    heads = max(1, args.hidden // 128)
    config = transformers.Qwen3MoeConfig(
        vocab_size=32000, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.moe_intermediate, num_hidden_layers=args.layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), head_dim=args.hidden // heads,
        num_experts=args.experts, num_experts_per_tok=min(args.topk, args.experts), norm_topk_prob=True)
    model = transformers.AutoModelForCausalLM.from_config(config)
    # Experts and routers with unit-scale outputs (HF's init, std 0.02, leaves the experts nearly
    # silent and the routing nearly uniform: a poor test of anything).
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "gate_up_proj"):
                m.gate_up_proj.normal_(0, args.hidden ** -0.5)
                m.down_proj.normal_(0, args.moe_intermediate ** -0.5)
            elif type(m).__name__ == "Qwen3MoeTopKRouter":
                m.weight.normal_(0, args.hidden ** -0.5)
    return model.to(device=args.device, dtype=dtype)


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    args = parse_args()
    register()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda")
                                                           else torch.float32)
    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device)
    else:
        torch.manual_seed(0)
        model = random_qwen3_moe(args, dtype)
    model.eval()
    vocab = model.config.get_text_config().vocab_size
    prompt = torch.randint(0, vocab, (args.batch, args.prompt_tokens), device=args.device)
    print(f"{type(model).__name__}, {dtype}, {args.device}: batch {args.batch}, prompt {args.prompt_tokens} "
          f"tokens, {args.new_tokens} new tokens")

    reference = None
    print(f"{'implementation':>18}  {'max |logit diff|':>16}  {'tokens/s':>10}")
    for implementation in args.implementations.split(","):
        model.set_experts_implementation(implementation)
        with torch.no_grad():
            logits = model(prompt).logits.float()
            if reference is None:
                reference = logits
            diff = (logits - reference).abs().max().item()
            generate = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                            pad_token_id=0)
            model.generate(prompt, **dict(generate, max_new_tokens=2, min_new_tokens=2))  # warm-up
            synchronize(args.device)
            start = time.perf_counter()
            model.generate(prompt, **generate)
            synchronize(args.device)
            seconds = time.perf_counter() - start
        print(f"{implementation:>18}  {diff:16.4g}  {args.batch * args.new_tokens / seconds:10.1f}")


if __name__ == "__main__":
    main()
