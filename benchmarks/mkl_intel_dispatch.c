/*
 * Benchmark-only: answers "yes" to Intel MKL's "is this an Intel CPU?" check.
 *
 * PyTorch's CPU library links Intel MKL, which runs torch.mm / torch.bmm in float32. On non-Intel CPUs
 * MKL picks its AVX2 kernels even where the CPU has AVX-512; on this project's AMD EPYC that halves the
 * speed of every fp32 matrix product (oneDNN, which runs the convolutions, is not affected).
 * benchmarks/run_cpu_mkl_avx512.sh builds this file and loads it with LD_PRELOAD to measure how much
 * the SSB models would gain from matrix products at AVX-512 speed. timm_ssb itself never loads it.
 */
int mkl_serv_intel_cpu_true(void) { return 1; }
