"""scripts/kernel_report.py's readings of ptxas' report and of cuobjdump's SASS, on text in the formats nvcc 13.0 and
cuobjdump print (no compiler needed)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "scripts"))
import kernel_report  # noqa: E402

MANGLED = "_ZN8flashmla19dense_decode_kernelILb1ELb0ELb1ELb0EEEvNS_12DecodeParamsE"
# A kernel with a stack and a device function ptxas did not inline (its own properties, inside the kernel's report),
# then one with nothing but registers.
PTXAS = f"""ptxas info    : 28 bytes gmem
ptxas info    : Compiling entry function '{MANGLED}' for 'sm_90a'
ptxas info    : Function properties for {MANGLED}
    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 245 registers, used 4 barriers, 264 bytes cumulative stack size, 1024 bytes smem
ptxas info    : Function properties for _Z8not_inlinedPfi
    256 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Compile time = 130.213 ms
ptxas info    : Compiling entry function '_Z6helperv' for 'sm_90a'
ptxas info    : Function properties for _Z6helperv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 22 registers
"""
SASS = f"""
\tcode for sm_90a
\t\tFunction : {MANGLED}
\t.headerflags\t@"EF_CUDA_ACCELERATORS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                                  /* 0x00000a00ff017b82 */
                                                                                           /* 0x000fe20000000800 */
        /*0010*/                   WARPGROUP.ARRIVE ;                                      /* 0x0000000000007990 */
        /*0020*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR4], R24, gsb0 ;   /* 0x0000000004187df0 */
        /*0030*/                   HGMMA.64x32x16.F32.BF16 R88, gdesc[UR8], RZ, !UPT ;     /* 0x00000000085879f0 */
        /*0040*/              @!P3 LDL.64 R4, [R1+0x8] ;                                   /* 0x0000080001048983 */
        /*0050*/               @P0 STL [R1], R2 ;                                          /* 0x0000000201000387 */
        /*0060*/                   UTMALDG.2D [UR8], [UR4] ;                               /* 0x00000008040075b4 */
        /*0068*/                   UBLKCP.S.G [UR8], [UR10], UR6 ;                         /* 0x000000060a0073ba */
        /*0070*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;                         /* 0x00000000000079b1 */
        /*0080*/                   EXIT ;                                                  /* 0x000000000000794d */
\t\t..........
\t\tFunction : _Z6helperv
        /*0000*/                   QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR4], R24 ;    /* 0x0000000004187df0 */
        /*0010*/                   EXIT ;                                                  /* 0x000000000000794d */
"""


def test_ptxas_report_is_read_per_kernel():
    kernels = kernel_report.parse_ptxas(PTXAS)
    assert kernels[MANGLED] == {"stack": 8, "spill_stores": 12, "spill_loads": 16, "registers": 245,
                                "static_smem": 1024}
    assert kernels["_Z6helperv"] == {"stack": 0, "spill_stores": 0, "spill_loads": 0, "registers": 22,
                                     "static_smem": 0}


def test_sass_counts_wgmma_by_shape_copies_and_local_memory():
    kernels = kernel_report.parse_sass(SASS)
    decode = kernels[MANGLED]
    assert decode["instructions"] == 10
    assert decode["counts"] == {"WARPGROUP": 2, "HGMMA": 2, "LDL": 1, "STL": 1, "UTMALDG": 1, "UBLKCP": 1}
    assert decode["shapes"] == {"64x256x16": 1, "64x32x16": 1}
    helper = kernels["_Z6helperv"]
    assert helper["instructions"] == 2 and helper["counts"] == {"QGMMA": 1}
    assert helper["shapes"] == {"fp8 64x128x32": 1}


def test_kernel_names_are_shortened_for_the_table():
    assert kernel_report.short_name("void flashmla::dense_decode_kernel<true, false, true, false>"
                                    "(flashmla::DecodeParams)") == "dense_decode_kernel<1,0,1,0>"
    assert kernel_report.short_name("void flashmla::(anonymous namespace)::quantize_kernel(__nv_bfloat16 const*, "
                                    "unsigned char*, long)") == "quantize_kernel"
    assert kernel_report.short_name("void flashmla::decode::(anonymous namespace)::narrow_decode_kernel<true>"
                                    "(flashmla::DecodeParams)") == "narrow_decode_kernel<1>"


def test_a_kernel_one_report_lacks_prints_dashes_not_zeros(capsys):
    rows = [{"kernel": "in_ptxas_only", "registers": 40, "stack": 0, "spill_stores": 0, "spill_loads": 0,
             "static_smem": 0, "instructions": None, "counts": {}, "wgmma_shapes": {}},
            {"kernel": "in_sass_only", "instructions": 12, "counts": {"HGMMA": 3}, "wgmma_shapes": {"64x64x16": 3}}]
    kernel_report.print_table(rows)
    ptxas_only, sass_only = capsys.readouterr().out.splitlines()[1:]
    assert ptxas_only.split()[1:] == ["40", "0/0", "0", "0", "-", "-", "-", "-", "-", "-"]
    assert sass_only.split()[1:7] == ["-", "-/-", "-", "-", "12", "3"]
