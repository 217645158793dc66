"""The soak's plot (make soak): requests/s, p99 and Envoy's RSS over time, with the faults."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(results_path, png_path):
    with open(results_path) as f:
        r = json.load(f)
    chunks, samples, events = r["chunks"], r["samples"], r["events"]
    fig, axes = plt.subplots(3, 1, figsize=(9, 6.5), sharex=True)
    mid = [c["t"] + c["seconds"] / 2 for c in chunks]
    axes[0].plot(mid, [c["rps"] for c in chunks], color="tab:blue")
    axes[0].set_ylabel("requests/s")
    axes[0].set_ylim(bottom=0)
    axes[1].plot(mid, [c["p99_ms"] for c in chunks], color="tab:orange")
    axes[1].set_ylabel("p99 (ms)")
    axes[1].set_ylim(bottom=0)
    axes[2].plot([s["t"] for s in samples], [s["rss_mib"] for s in samples], color="tab:green")
    axes[2].set_ylabel("Envoy RSS (MiB)")
    axes[2].set_ylim(bottom=0)
    axes[2].set_xlabel("seconds")
    for e in events:
        color = "tab:red" if "503" in e["what"] or "hangs" in e["what"] or "garbage" in e["what"] else "0.8"
        style = ":" if e["what"].startswith("policy") else "-"
        for ax in axes:
            ax.axvline(e["t"], color=color, linestyle=style, linewidth=0.6, alpha=0.5)
    verdict = "passed" if r["passed"] else "FAILED"
    fig.suptitle(
        f"agentgate soak: {r['seconds']} s, {r['requests']} requests, {verdict} "
        "(red: IdP 503/hang/garbage; dotted: policy push)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
