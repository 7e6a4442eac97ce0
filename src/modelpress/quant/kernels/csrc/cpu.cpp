// Which instruction-set builds this CPU runs, and cache eviction for the speed guard's cold timings.
#include "cpu.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>

namespace mpk {

// ---- CPU features --------------------------------------------------------------------------------------
bool cpu_supports(const std::string& isa) {
  if (isa == "scalar") return true;
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (isa == "avx2") return avx2;
  if (isa == "avx512") return avx512;
  if (isa == "avx512_vnni") return avx512 && __builtin_cpu_supports("avx512vnni");
#if defined(__clang__) || (__GNUC__ >= 11)
  if (isa == "avx2_vnni") return avx2 && __builtin_cpu_supports("avxvnni");
#endif
#endif
  return false;
}

// loop_level (common.h): the CPU's level, lowered by the environment switches (read at every call: tests change them)
static int level_of(const char* name, bool aten) {
  if (!name || !*name) return 2;
  std::string v(name);
  for (auto& c : v) c = (char)std::tolower((unsigned char)c);
  if (v == "avx512" || v == "avx512_vnni") return 2;
  if (v == "avx2" || v == "avx2_vnni") return 1;
  if (v == "default" || v == "scalar" || v == "none") return 0;
  return aten ? 2 : 0;  // (an unknown ATEN value leaves torch's own choice; cpu.py refuses an unknown MODELPRESS_ISA)
}

int loop_level() {
  static const int cpu = cpu_supports("avx512") ? 2 : cpu_supports("avx2") ? 1 : 0;
  return std::min({cpu, level_of(std::getenv("ATEN_CPU_CAPABILITY"), true), level_of(std::getenv("MODELPRESS_ISA"),
                                                                                     false)});
}

const IsaTable* find_table(const std::string& isa) {
  const IsaTable* t = nullptr;
  if (isa == "avx512_vnni") t = table_avx512_vnni();
  else if (isa == "avx512") t = table_avx512();
  else if (isa == "avx2_vnni") t = table_avx2_vnni();
  else if (isa == "avx2") t = table_avx2();
  else if (isa == "scalar") t = table_scalar();
  return t && cpu_supports(isa) ? t : nullptr;
}

std::vector<std::string> available() {
  std::vector<std::string> out;
  for (const char* n : {"avx512_vnni", "avx512", "avx2_vnni", "avx2", "scalar"})
    if (find_table(n)) out.push_back(n);
  return out;
}

// ---- cache eviction (the speed guard times large layers with their weights out of cache) -----------------
void flush(int64_t ptr, int64_t nbytes) {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  const char* p = (const char*)ptr;
  for (int64_t i = 0; i < nbytes; i += 64) __builtin_ia32_clflush(p + i);
  __builtin_ia32_mfence();
#else
  (void)ptr;
  (void)nbytes;
#endif
}

}  // namespace mpk
