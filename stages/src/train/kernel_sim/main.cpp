// Runs the kernels of src/train/kernels.cu on the CPU (cuda_sim.hpp), one launch per request, for
// the stages' tests (src/train/kernel_sim.rs, which builds this file and speaks its protocol).
//
// Request (stdin, little-endian), repeated until end of input:
//   u32 name length, name; u32 grid x, y, z; u32 block x, y, z; u32 argument count; then per
//   argument a kind byte and its value: 'F' f32 buffer / 'U' u32 buffer (u64 length in
//   entries, then the entries), 'u' u32, 'q' u64, 'f' f32.
// Reply (stdout): every buffer argument after the launch, in order (u64 length, entries).
#include "cuda_sim.hpp"

#include "../kernels.cu"

#include <cstring>
#include <string>

namespace {

struct Arg {
    char kind;
    std::vector<unsigned char> bytes;
};

bool read(void *p, size_t n) { return std::fread(p, 1, n, stdin) == n; }

template <class T> T get() {
    T v;
    if (!read(&v, sizeof v)) {
        sim::fail("truncated request");
    }
    return v;
}

struct Args {
    std::string name;
    std::vector<Arg> a;

    Arg &at(size_t i, char kind) {
        if (i >= a.size() || a[i].kind != kind) {
            std::fprintf(stderr, "cuda_sim: %s: argument %zu is not of kind '%c'\n", name.c_str(), i, kind);
            std::exit(3);
        }
        return a[i];
    }
    float *F(size_t i) { return reinterpret_cast<float *>(at(i, 'F').bytes.data()); }
    unsigned int *U(size_t i) { return reinterpret_cast<unsigned int *>(at(i, 'U').bytes.data()); }
    template <class T> T scalar(size_t i, char kind) {
        T v;
        std::memcpy(&v, at(i, kind).bytes.data(), sizeof v);
        return v;
    }
    unsigned int u(size_t i) { return scalar<unsigned int>(i, 'u'); }
    unsigned long long q(size_t i) { return scalar<unsigned long long>(i, 'q'); }
    float f(size_t i) { return scalar<float>(i, 'f'); }
    void count(size_t n) {
        if (a.size() != n) {
            std::fprintf(stderr, "cuda_sim: %s takes %zu arguments, not %zu\n", name.c_str(), n, a.size());
            std::exit(3);
        }
    }
};

void run(Args &A, dim3 grid, dim3 block) {
    const std::string &n = A.name;
    if (n == "pipe_adam_f32") {
        A.count(12);
        sim::launch(grid, block, [&] {
            pipe_adam_f32(A.F(0), A.F(1), A.F(2), A.F(3), A.q(4), A.f(5), A.f(6), A.f(7), A.f(8), A.f(9),
                          A.f(10), A.f(11));
        });
    } else if (n == "pipe_radix_hist") {
        A.count(7);
        sim::launch(grid, block, [&] { pipe_radix_hist(A.F(0), A.q(1), A.U(2), A.u(3), A.u(4), A.u(5), A.U(6)); });
    } else if (n == "pipe_compact_f32") {
        A.count(9);
        sim::launch(grid, block, [&] {
            pipe_compact_f32(A.F(0), A.F(1), A.F(2), A.U(3), A.U(4), A.u(5), A.U(6), A.F(7), A.U(8));
        });
    } else if (n == "pipe_decode_f32") {
        A.count(9);
        sim::launch(grid, block, [&] {
            pipe_decode_f32(A.U(0), A.U(1), A.F(2), A.F(3), A.F(4), A.u(5), A.u(6), A.u(7), A.F(8));
        });
    } else if (n == "pipe_code_grads_f32") {
        A.count(7);
        sim::launch(grid, block, [&] { pipe_code_grads_f32(A.U(0), A.U(1), A.F(2), A.F(3), A.u(4), A.u(5), A.F(6)); });
    } else if (n == "pipe_sparse_backward_f32") {
        A.count(12);
        sim::launch(grid, block, [&] {
            pipe_sparse_backward_f32(A.U(0), A.U(1), A.U(2), A.F(3), A.F(4), A.F(5), A.F(6), A.u(7), A.u(8),
                                     A.F(9), A.F(10), A.F(11));
        });
    } else if (n == "pipe_transpose_f32") {
        A.count(4);
        sim::launch(grid, block, [&] { pipe_transpose_f32(A.F(0), A.u(1), A.u(2), A.F(3)); });
    } else {
        std::fprintf(stderr, "cuda_sim: no kernel `%s`\n", n.c_str());
        std::exit(3);
    }
}

} // namespace

int main() {
    unsigned int len;
    while (read(&len, sizeof len)) {
        Args A;
        A.name.resize(len);
        if (!read(A.name.data(), len)) {
            sim::fail("truncated request");
        }
        dim3 grid{get<unsigned int>(), get<unsigned int>(), get<unsigned int>()};
        dim3 block{get<unsigned int>(), get<unsigned int>(), get<unsigned int>()};
        const unsigned int nargs = get<unsigned int>();
        for (unsigned int i = 0; i < nargs; ++i) {
            Arg arg{get<char>(), {}};
            switch (arg.kind) {
            case 'F':
            case 'U': {
                const auto n = get<unsigned long long>();
                arg.bytes.resize(n * 4);
                if (!read(arg.bytes.data(), arg.bytes.size())) {
                    sim::fail("truncated buffer");
                }
                break;
            }
            case 'u':
            case 'f':
                arg.bytes.resize(4);
                if (!read(arg.bytes.data(), 4)) {
                    sim::fail("truncated scalar");
                }
                break;
            case 'q':
                arg.bytes.resize(8);
                if (!read(arg.bytes.data(), 8)) {
                    sim::fail("truncated scalar");
                }
                break;
            default:
                sim::fail("unknown argument kind");
            }
            A.a.push_back(std::move(arg));
        }
        run(A, grid, block);
        for (const Arg &arg : A.a) {
            if (arg.kind == 'F' || arg.kind == 'U') {
                const unsigned long long n = arg.bytes.size() / 4;
                std::fwrite(&n, sizeof n, 1, stdout);
                std::fwrite(arg.bytes.data(), 1, arg.bytes.size(), stdout);
            }
        }
        std::fflush(stdout);
    }
    return 0;
}
