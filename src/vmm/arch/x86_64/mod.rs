//! x86_64 specifics: memory layout, boot-time register state, CPUID
//! templates and the MP table.

pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod msrs;
pub mod regs;
