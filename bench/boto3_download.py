"""The boto3 baseline: what a Python user writes by hand to download a prefix.

Lists the prefix and calls `client.download_file` per object, 8 files at a time, with the
default TransferConfig. Credentials and the endpoint come from the environment (AWS_*).

    python bench/boto3_download.py --bucket B --prefix P/ --dest DIR
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--prefix", required=True, help="key prefix, ending in '/'")
    parser.add_argument("--dest", required=True)
    parser.add_argument("--files-at-once", type=int, default=8)
    args = parser.parse_args(argv)

    import boto3

    client = boto3.client("s3")
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=args.bucket, Prefix=args.prefix
    ):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    if not keys:
        print(f"nothing under s3://{args.bucket}/{args.prefix}", file=sys.stderr)
        return 1

    def fetch(key: str) -> None:
        target = os.path.join(args.dest, key[len(args.prefix):])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        client.download_file(args.bucket, key, target)

    with ThreadPoolExecutor(args.files_at_once) as pool:
        for future in [pool.submit(fetch, key) for key in keys]:
            future.result()
    print(f"downloaded {len(keys)} objects")
    return 0


if __name__ == "__main__":
    sys.exit(main())
