"""A stand-in for a Triton kernel that records each launch's options (constexprs and launch options) and grid, so a
test can say which variant of a kernel an op ran, and how many programs it launched."""


class RecordingKernel:
    """A Triton kernel that records the options and the grid of each launch."""

    def __init__(self, kernel):
        self.kernel, self.options, self.grids = kernel, [], []

    def __getitem__(self, grid):
        def launch(*args, **options):
            self.options.append(options)
            self.grids.append(tuple(grid))
            return self.kernel[grid](*args, **options)
        return launch
