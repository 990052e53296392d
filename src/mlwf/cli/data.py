"""``mlwf dataset`` (images as class folders) and ``mlwf s3`` (objects in the store)."""

from __future__ import annotations

import json
import os
import sys

from mlwf.cli.options import Parser, common, open_store


_OVERWRITE_HELP = ("replace what OUT holds: class folders and images this command does not write are removed "
                   "(without it, an OUT holding anything else is refused)")


def add_parsers(sub) -> None:
    """``mlwf dataset digits|idx`` and ``mlwf s3 ...``."""
    ds = sub.add_parser("dataset", help="write a dataset as PNG class folders OUT/<label>/<index>.png")
    dss = ds.add_subparsers(dest="dataset", required=True, parser_class=Parser)
    dg = dss.add_parser("digits", help="scikit-learn's bundled digits (1,797 8×8 images)")
    dg.add_argument("out", metavar="OUT", help="the folder to write the class folders into (created if missing)")
    dg.add_argument("--n", type=int, help="only the first N images")
    dg.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    dg.add_argument("--json", action="store_true")
    dg.add_argument("--debug", action="store_true")
    di = dss.add_parser("idx", help="an MNIST-format IDX pair (MNIST, Fashion-MNIST), gzipped or not")
    di.add_argument("images", metavar="IMAGES", help="the IDX images file (idx3-ubyte), raw or gzipped")
    di.add_argument("labels", metavar="LABELS", help="the IDX labels file (idx1-ubyte) of the same images")
    di.add_argument("out", metavar="OUT", help="the folder to write the class folders into (created if missing)")
    di.add_argument("--n", type=int, help="only N images")
    di.add_argument("--offset", type=int, default=0, help="start at image K (default 0)")
    di.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    names = di.add_mutually_exclusive_group()
    names.add_argument("--names", choices=("fashion-mnist", "mnist"),
                       help="name the class folders with the known class names of this dataset "
                            "(default: label numbers 0, 1, …)")
    names.add_argument("--names-file", metavar="FILE",
                       help="name the class folders from FILE: one name per line, label 0 first")
    di.add_argument("--max-memory", metavar="SIZE",
                    help="most memory the images converted at once may take (default MLWF_MAX_MEMORY or 512MiB); "
                         "convert more in parts with --n and --offset")
    di.add_argument("--json", action="store_true")
    di.add_argument("--debug", action="store_true")

    s3 = sub.add_parser("s3", help="manage objects in the configured store (directory or S3)")
    s3s = s3.add_subparsers(dest="s3_command", required=True, parser_class=Parser)
    up = s3s.add_parser("upload-dir", help="upload a folder (idempotent: unchanged objects are skipped)")
    up.add_argument("--host-path", required=True, metavar="DIR", help="the folder on this machine to upload")
    up.add_argument("--s3-path", required=True, metavar="PREFIX",
                    help="the prefix in the store to upload it under (e.g. ml-training/mnist-images-2k)")
    up.add_argument("--create-bucket", action="store_true", help="create the bucket if it does not exist")
    up.add_argument("--overwrite", action="store_true",
                    help="replace objects that hold other bytes (without it, such an upload is refused)")
    common(up)
    down = s3s.add_parser("download-dir", help="download every object under a prefix into a folder")
    down.add_argument("--s3-path", required=True, metavar="PREFIX", help="the prefix in the store to download")
    down.add_argument("--host-path", required=True, metavar="DIR", help="the folder on this machine to write into")
    down.add_argument("--overwrite", action="store_true",
                      help="replace local files that hold other bytes (without it, such a download is refused)")
    common(down)
    cb = s3s.add_parser("clear-bucket", help="delete every object in the bucket")
    common(cb)
    cd = s3s.add_parser("clear-dir", help="delete every object in a folder (PREFIX/…); never the whole bucket")
    cd.add_argument("--prefix", required=True, help="the folder (PREFIX/…) whose objects are deleted")
    common(cd)
    ls = s3s.add_parser("ls", help="list objects")
    ls.add_argument("--prefix", default="", help="list only the objects under this prefix (default: all)")
    common(ls)



def dataset(args) -> int:
    from mlwf import datasets
    from mlwf.terminal import count_bar

    with count_bar("writing images", enabled=not args.json) as progress:
        if args.dataset == "digits":
            n = datasets.write_digits(args.out, n=args.n, overwrite=args.overwrite, progress=progress)
        else:
            from mlwf import budget
            from mlwf.settings import Settings

            # The images converted are held at once: taken from this process's budget before they are read.
            flag = args.max_memory
            budget.configure(budget.parse_size(flag, budget.FLAG) if flag is not None
                             else Settings.resolve().max_memory)
            if args.names_file is not None:
                class_names = datasets.read_class_names(args.names_file)
            else:
                class_names = datasets.KNOWN_CLASS_NAMES.get(args.names)
            n = datasets.write_idx(args.images, args.labels, args.out, n=args.n, offset=args.offset,
                                   class_names=class_names, overwrite=args.overwrite, progress=progress)
    if args.json:
        print(json.dumps({"images": n, "out": os.path.abspath(args.out)}))
    else:
        print(f"wrote {n} images to {args.out}/<label>/<index>.png")
    return 0


def s3(args) -> int:
    from mlwf import bulk
    from mlwf.terminal import count_bar

    store = open_store(args)
    try:
        cmd = args.s3_command
        if cmd == "ls":
            objects = store.list(args.prefix)
            if args.json:
                print(json.dumps({"bucket": store.bucket, "prefix": args.prefix, "count": len(objects),
                                  "bytes": sum(o.size for o in objects),
                                  "objects": [{"key": o.key, "size": o.size} for o in objects]}))
            else:
                for o in objects:
                    print(f"{o.size:>10}  {o.key}")
                print(f"{len(objects)} objects, {sum(o.size for o in objects)} bytes", file=sys.stderr)
            return 0
        with count_bar(cmd, enabled=not args.json) as progress:
            if cmd == "upload-dir":
                result = bulk.upload_dir(store, args.host_path, args.s3_path, create_bucket=args.create_bucket,
                                         overwrite=args.overwrite, progress=progress)
                text = (f"uploaded {result['uploaded']} of {result['files']} files to "
                        f"{store.bucket}/{args.s3_path} ({result['skipped']} unchanged, skipped"
                        + (f"; {result['replaced']} replaced" if result["replaced"] else "")
                        + (f"; {result['ignored']} links or special files ignored, e.g. "
                           f"{result['ignored_examples'][0]}" if result["ignored"] else "") + ")")
            elif cmd == "download-dir":
                result = bulk.download_dir(store, args.s3_path, args.host_path, overwrite=args.overwrite,
                                           progress=progress)
                text = (f"downloaded {result['written']} of {result['objects']} objects to {args.host_path} "
                        f"({result['unchanged']} already there, unchanged)")
            elif cmd == "clear-bucket":
                result = bulk.clear_bucket(store, progress=progress)
                text = f"deleted {result['deleted']} objects from bucket {store.bucket}"
            else:
                result = bulk.clear_prefix(store, args.prefix, progress=progress)
                text = f"deleted {result['deleted']} objects under {bulk.folder_prefix(args.prefix, flag='--prefix')}"
        print(json.dumps({"bucket": store.bucket, **result}) if args.json else text)
        return 0
    finally:
        store.close()


def handle(args) -> int:
    return dataset(args) if args.command == "dataset" else s3(args)
