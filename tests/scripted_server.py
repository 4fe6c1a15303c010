"""`m3mlx serve` with the model's output scripted, for tests that need known M3 replies.

    python tests/scripted_server.py SCRIPTS.json m3mlx-serve-options...

SCRIPTS.json maps a marker to a reply text (tests/scripted_model.py). Everything else is
the real `m3mlx serve`: loading, the server, the engine, the reply parser and the API events.
"""

import json
import sys

import m3mlx.cli.options as options
from m3mlx.cli.serve import serve

from scripted_model import Scripted


def main():
    scripts = json.loads(open(sys.argv[1]).read())
    load = options.load_or_fail

    def scripted_load(model_path, dtype, *more):
        model, tokenizer = load(model_path, dtype, *more)
        return Scripted(model, tokenizer, scripts), tokenizer

    options.load_or_fail = scripted_load
    import m3mlx.cli.serve as serve_module

    serve_module.load_or_fail = scripted_load
    serve.main(sys.argv[2:], prog_name="m3mlx serve", standalone_mode=True)


if __name__ == "__main__":
    main()
