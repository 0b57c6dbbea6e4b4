"""What every layer of gptj_tvm may use: the error type, the staging of output folders, GPT-J's constants, the
interleaved comparison of timings, and a reader of binary blobs. Imports nothing else of the project."""
