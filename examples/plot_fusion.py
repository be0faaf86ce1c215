"""Plot what a trained LayAlign model learned: the layer-wise fusion weights and the gate of each LLM layer.

    pip install matplotlib
    python examples/plot_fusion.py --model outputs/demo/stage2 --output_dir outputs/demo/plots

Writes `fusion_weights.png`: for keys and for values, a heatmap of how much each adapted LLM layer's source mixes
each encoder layer (the rows of the fusion's layer-axis linear map), and `gates.png`: the gate of each adapted
LLM layer. The paper analyses exactly these.
"""

import argparse
from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def fusion_weights(model):
    """`(keys, values)`, each `(num_adapted_layers, num_fused_encoder_layers)`: row m mixes the encoder layers for
    adapted layer m (the fusion's `layer_mix` rows 2m and 2m + 1)."""
    if model.fusion is None:
        raise SystemExit("This model has no layer fusion (use_layer_fusion=False): nothing to plot.")
    weights = model.fusion.layer_mix.weight.detach().float().cpu()
    return weights[0::2].numpy(), weights[1::2].numpy()


def plot(model, output_dir: Path) -> tuple[Path, Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    keys, values = fusion_weights(model)
    encoder_layers, llm_layers = model.config.fused_encoder_layers, model.config.adapted_llm_layers
    figure, axes = plt.subplots(1, 2, figsize=(12, 0.25 * len(llm_layers) + 3), constrained_layout=True)
    limit = max(abs(keys).max(), abs(values).max())
    for axis, matrix, title in zip(axes, (keys, values), ("keys", "values")):
        image = axis.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
        axis.set_title(f"fusion weights for the {title}")
        axis.set_xlabel("encoder layer (hidden state index)")
        axis.set_ylabel("adapted LLM layer")
        axis.set_xticks(range(len(encoder_layers)), encoder_layers, fontsize=7)
        axis.set_yticks(range(len(llm_layers)), llm_layers, fontsize=7)
    figure.colorbar(image, ax=axes, shrink=0.8)
    weights_path = output_dir / "fusion_weights.png"
    figure.savefig(weights_path, dpi=120)
    plt.close(figure)

    gates = model.gates().detach().float().cpu().numpy()
    figure, axis = plt.subplots(figsize=(max(6, 0.25 * len(llm_layers)), 3), constrained_layout=True)
    axis.bar([str(layer) for layer in llm_layers], gates)
    axis.axhline(0, color="black", linewidth=0.5)
    axis.set_xlabel("adapted LLM layer")
    axis.set_ylabel("gate")
    axis.set_title("gate of the fused branch per LLM layer")
    gates_path = output_dir / "gates.png"
    figure.savefig(gates_path, dpi=120)
    plt.close(figure)
    return weights_path, gates_path


def main(argv: list[str] | None = None) -> tuple[Path, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--output_dir", default=None, help="Default: <model>/plots.")
    args = parser.parse_args(argv)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True)
    paths = plot(model, Path(args.output_dir) if args.output_dir else Path(args.model) / "plots")
    print("\n".join(str(path) for path in paths))
    return paths


if __name__ == "__main__":
    main()
