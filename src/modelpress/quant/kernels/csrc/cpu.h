// CPU features (cpu.cpp), for the binding. Kept out of common.h: the instruction-set files include that one and must
// not see standard-library inline functions (see common.h).
#pragma once
#include <string>
#include <vector>

#include "common.h"

namespace mpk {

bool cpu_supports(const std::string& isa);  // whether this CPU runs build `isa`
const IsaTable* find_table(const std::string& isa);  // its table if so, else null
std::vector<std::string> available();  // the builds this CPU runs, best first
void flush(int64_t ptr, int64_t nbytes);  // evict [ptr, ptr + nbytes) from the caches (x86 clflush; else a no-op)

}  // namespace mpk
