"""test_sampler.py's four sampling tests against split_sampler.py, with the flash kernel, then with the math
fallback (the other two call sampler.py's own Decoder and prepacked()).  python split_test.py"""
import importlib.util
import sys
import types

sys.path.insert(0, ".")
import model as M  # noqa: E402
import test_sampler  # noqa: E402
from test_all import run_all  # noqa: E402

spec = importlib.util.spec_from_file_location("split_sampler", __file__.replace("split_test.py", "split_sampler.py"))
split = importlib.util.module_from_spec(spec)
spec.loader.exec_module(split)
M.sampler = test_sampler.sampler = split
SAMPLING = ("test_fast_sampler_draws_the_plain_samplers_tokens_llama",
            "test_fast_sampler_draws_the_plain_samplers_tokens_qwen3_with_early_stops",
            "test_a_shared_prefix_is_prefilled_once_and_draws_stay_the_plain_samplers",
            "test_generate_in_chunks_is_generate_at_once")
tests = types.ModuleType("split_sampling")
tests.__dict__.update({n: getattr(test_sampler, n) for n in SAMPLING})
failed = run_all([tests])
split.flash.ok = False
sys.exit(1 if run_all([tests]) or failed else 0)
