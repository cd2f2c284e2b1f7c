import json, os, shutil, sys
sys.path.insert(0, "/tmp/old55")
import train
src, dst = sys.argv[1], sys.argv[2]
shutil.rmtree(dst, ignore_errors=True)
shutil.copytree(os.path.join(src, "ckpt"), os.path.join(dst, "ckpt"))
shutil.copy(os.path.join(src, "metrics.jsonl"), dst)
old = vars(train.get_args([]))
new = json.load(open(os.path.join(src, "ckpt", "args.json")))
args = {**old, **{k: v for k, v in new.items() if k in old}, "format": new["format"], "out": dst, "layers": new.get("wrap_layers", new.get("layers"))}
json.dump(args, open(os.path.join(dst, "ckpt", "args.json"), "w"), indent=1)
print(sorted(set(old) - set(new)), sorted(set(new) - set(old)))
