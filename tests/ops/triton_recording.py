"""A stand-in for a Triton kernel that records each launch's options (constexprs and launch options), so a test can
say which variant of a kernel an op ran."""


class RecordingKernel:
    """A Triton kernel that records the options of each launch."""

    def __init__(self, kernel):
        self.kernel, self.options = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **options):
            self.options.append(options)
            return self.kernel[grid](*args, **options)
        return launch
