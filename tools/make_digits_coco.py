"""Write the embedded digits detection/segmentation dataset (COCO format) under data/.

    python tools/make_digits_coco.py [--out data/digits_coco] [--seed 0]

Deterministic for a given seed; a no-op when the same dataset is already there.
"""
import argparse
import time

from cbn_mmdet.datasets.digits_coco import generate


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='data/digits_coco')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--num-train', type=int, default=1000)
    p.add_argument('--num-val', type=int, default=200)
    p.add_argument('--size', type=int, default=128, help='canvas side in pixels')
    a = p.parse_args(argv)
    t = time.time()
    meta = generate(a.out, seed=a.seed, num_train=a.num_train, num_val=a.num_val, size=a.size)
    print(f'{a.out}: {meta["num_train"]} train images ({meta["instances_train"]} digits), '
          f'{meta["num_val"]} val images ({meta["instances_val"]} digits) [{time.time() - t:.1f}s]')


if __name__ == '__main__':
    main()
