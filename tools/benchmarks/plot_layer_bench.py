"""Plot a layer_bench.py JSON: step time relative to BN per shape, one line per norm.

    python tools/benchmarks/plot_layer_bench.py results.json [--out layer_bench.png]
"""
import argparse
import json


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('json')
    p.add_argument('--out', default='layer_bench.png')
    a = p.parse_args(argv)
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    with open(a.json) as f:
        res = json.load(f)
    shapes = []
    for r in res['rows']:
        s = 'x'.join(map(str, r['shape']))
        if s not in shapes:
            shapes.append(s)
    norms = []
    for r in res['rows']:
        if r['norm'] not in norms:
            norms.append(r['norm'])
    fig, ax = plt.subplots(figsize=(7, 4))
    for norm in norms:
        ys = [next(r['time_vs_bn'] for r in res['rows']
                   if r['norm'] == norm and 'x'.join(map(str, r['shape'])) == s) for s in shapes]
        ax.plot(range(len(shapes)), ys, marker='o', label=norm)
    ax.set_xticks(range(len(shapes)), shapes)
    ax.set_ylabel('step time / BN step time')
    env = res['environment']
    ax.set_title(f"conv3x3 + norm, fwd+bwd+SGD ({env['device']}, torch {env['torch']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)


if __name__ == '__main__':
    main()
