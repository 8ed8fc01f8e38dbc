//! Client (instrumentation) API and the shipped tools.
//!
//! A client is called once per translated block with the block's decoded
//! guest instructions and asks for [`Snippet`]s to be inserted before or
//! after guest instructions. A snippet names the general purpose registers it
//! clobbers and whether it clobbers the arithmetic flags; the engine spills
//! and restores exactly those (registers to per-CPU spill slots, flags with
//! `lahf`/`seto` only when the flags liveness analysis says they are live).
//! Snippet code may address the client's per-CPU slots with [`client_slot`].

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use iced_x86::{Code, Instruction, InstructionInfoFactory, MemoryOperand, OpAccess, Register};

use crate::scratch::{COUNTERS, OFF_CLIENT, OFF_COUNTERS};

/// Where a snippet goes. `After` is only honoured for instructions that are
/// not control transfers (after a branch there is no single "after").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Where {
    Before(usize),
    After(usize),
}

/// Inserted code.
#[derive(Clone, Debug, Default)]
pub struct Snippet {
    pub code: Vec<Instruction>,
    /// 64-bit GPRs the code overwrites (not rsp).
    pub clobbers: Vec<Register>,
    pub clobbers_flags: bool,
}

/// Insertions requested for one block.
#[derive(Default)]
pub struct Inserts {
    pub(crate) list: Vec<(Where, Snippet)>,
}

impl Inserts {
    pub fn insert(&mut self, at: Where, s: Snippet) {
        self.list.push((at, s));
    }
}

/// Information about the block being translated.
pub struct BlockInfo<'a> {
    /// Guest address of the first instruction.
    pub start: u64,
    /// Guest instructions that will execute when the block runs (a stop
    /// instruction such as `int3`/`ud2`/invalid bytes is not included).
    pub insns: &'a [Instruction],
    /// Arithmetic flags (`iced_x86::RflagsBits`) live before each
    /// instruction; `flags_live[insns.len()]` is after the block (everything,
    /// conservatively). A snippet that clobbers flags costs one instruction
    /// where this is 0, and a save/restore around it elsewhere.
    pub flags_live: &'a [u32],
}

impl BlockInfo<'_> {
    /// First instruction before which no arithmetic flag is live: where a
    /// flags-clobbering snippet needs no flags save.
    pub fn flags_dead_at(&self) -> Option<usize> {
        self.flags_live[..self.insns.len()].iter().position(|&l| l == 0)
    }
}

/// `counter += n` for a 64-bit counter at `mem`, after `setup` (which
/// clobbers `setup_clobbers`, e.g. loads the counter's address; `mem` must not
/// use rax). Placed before an instruction where the flags are dead when the
/// block has one (one `add`), else at the block start as a flags-free
/// `mov`/`lea`/`mov` through rax.
fn insert_counter_add(
    b: &BlockInfo<'_>,
    o: &mut Inserts,
    setup: &[Instruction],
    setup_clobbers: &[Register],
    mem: MemoryOperand,
    n: i32,
) {
    let mut code: Vec<Instruction> = setup.to_vec();
    let mut clobbers: Vec<Register> = setup_clobbers.to_vec();
    let (at, clobbers_flags) = match b.flags_dead_at() {
        Some(k) => {
            let Ok(add) = Instruction::with2(Code::Add_rm64_imm32, mem, n) else { return };
            code.push(add);
            (k, true)
        }
        None => {
            let (Ok(ld), Ok(lea), Ok(st)) = (
                Instruction::with2(Code::Mov_r64_rm64, Register::RAX, mem),
                Instruction::with2(
                    Code::Lea_r64_m,
                    Register::RAX,
                    MemoryOperand::with_base_displ(Register::RAX, n as i64),
                ),
                Instruction::with2(Code::Mov_rm64_r64, mem, Register::RAX),
            ) else {
                return;
            };
            code.extend_from_slice(&[ld, lea, st]);
            clobbers.push(Register::RAX);
            (0, false)
        }
    };
    o.insert(Where::Before(at), Snippet { code, clobbers, clobbers_flags });
}

/// The instrumentation interface.
pub trait Client {
    fn instrument(&mut self, block: &BlockInfo<'_>, out: &mut Inserts);
}

/// `gs:[client slot i]` as a memory operand (i < 16).
pub fn client_slot(i: usize) -> MemoryOperand {
    MemoryOperand::new(Register::None, Register::None, 1, OFF_CLIENT + 8 * (i as i64 & 15), 8, false, Register::GS)
}

/// `gs:[per-CPU counter i]` as a memory operand (i < [`COUNTERS`]).
pub fn counter_slot(i: usize) -> MemoryOperand {
    MemoryOperand::new(
        Register::None,
        Register::None,
        1,
        OFF_COUNTERS + 8 * (i % COUNTERS) as i64,
        8,
        false,
        Register::GS,
    )
}

/// `null`: no instrumentation.
pub struct NullClient;
impl Client for NullClient {
    fn instrument(&mut self, _b: &BlockInfo<'_>, _o: &mut Inserts) {}
}

/// `inscount`: exact count of executed guest instructions. Each basic block
/// adds its length to one of the per-CPU counters ([`crate::Scratch::counters`],
/// chosen by hashing the block's address), where the flags are dead if
/// anywhere (a block always runs to its end or is left by its last
/// instruction); the count is the sum of the counters ([`InsCount::total`]).
/// Spreading the updates keeps blocks that run one after another from
/// serializing on one memory location (a one-block loop still does).
pub struct InsCount;
impl InsCount {
    /// The counter a block at `pc` adds to.
    pub fn slot(pc: u64) -> usize {
        ((pc ^ (pc >> 17)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 52) as usize % COUNTERS
    }
    /// Instructions counted on the CPU whose block is `s`.
    pub fn total(s: &crate::Scratch) -> u64 {
        // SAFETY: the environment set `counters_ptr` to this CPU's block.
        unsafe { s.counters() }.c.iter().fold(0u64, |a, c| a.wrapping_add(*c))
    }
    /// Zero the counters of `s`'s CPU.
    pub fn reset(s: &mut crate::Scratch) {
        // SAFETY: as in `total`; nothing runs translated code on this CPU
        // while the caller holds `&mut` to its block.
        unsafe { (*(s.counters_ptr as *mut crate::scratch::Counters)).c.fill(0) };
    }
}
impl Client for InsCount {
    fn instrument(&mut self, b: &BlockInfo<'_>, o: &mut Inserts) {
        if b.insns.is_empty() {
            return;
        }
        insert_counter_add(b, o, &[], &[], counter_slot(Self::slot(b.start)), b.insns.len() as i32);
    }
}

/// `bbcov`: every executed block with its hit count.
#[derive(Default)]
pub struct BbCov {
    counters: BTreeMap<u64, CovCounter>,
}

/// One block's counter and the length of its native bytes when last translated.
struct CovCounter {
    hits: Box<UnsafeCell<u64>>,
    len: u32,
}

/// A block that executed: what `drcov`-style coverage files record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CovBlock {
    /// Native address of the first instruction.
    pub start: u64,
    /// Native bytes of its instructions (of the latest translation if the block was
    /// retranslated from new bytes; a stop instruction ending it is not counted).
    pub len: u32,
    pub hits: u64,
}

impl BbCov {
    pub fn new() -> Self {
        Self::default()
    }
    /// (block start, hits) for every block that executed at least once.
    pub fn hits(&self) -> Vec<(u64, u64)> {
        self.blocks().iter().map(|b| (b.start, b.hits)).collect()
    }
    /// Every block that executed at least once, by address.
    pub fn blocks(&self) -> Vec<CovBlock> {
        self.counters
            .iter()
            // SAFETY: reading a counter the translated code increments; the
            // caller reads results only when no translated code runs.
            .map(|(k, c)| CovBlock { start: *k, len: c.len, hits: unsafe { *c.hits.get() } })
            .filter(|b| b.hits != 0)
            .collect()
    }
}

impl Client for BbCov {
    fn instrument(&mut self, b: &BlockInfo<'_>, o: &mut Inserts) {
        let len = b.insns.last().map_or(0, |i| u32::try_from(i.next_ip().wrapping_sub(b.start)).unwrap_or(u32::MAX));
        let c = self.counters.entry(b.start).or_insert_with(|| CovCounter { hits: Box::new(UnsafeCell::new(0)), len });
        c.len = len;
        let addr = c.hits.get() as u64;
        let Ok(a) = Instruction::with2(Code::Mov_r64_imm64, Register::RCX, addr) else { return };
        insert_counter_add(b, o, &[a], &[Register::RCX], MemoryOperand::with_base(Register::RCX), 1);
    }
}

/// `memtrace`: (address, size, write) of every memory operand into a ring.
///
/// Per-CPU state: client slot 1 = total number of records ever written,
/// slot 2 = ring base address. The ring has `1 << ring_bits` 16-byte entries:
/// `[effective address, size | (is_write << 16)]`. The effective address is
/// the operand's offset (an `fs:`/`gs:` segment base is not added) and, for a
/// `rep` string instruction, the address of the first element.
pub struct MemTrace {
    pub ring_bits: u32,
    info: InstructionInfoFactory,
}

pub const MEMTRACE_COUNT_SLOT: usize = 1;
pub const MEMTRACE_BASE_SLOT: usize = 2;

impl MemTrace {
    pub fn new(ring_bits: u32) -> Self {
        Self { ring_bits: ring_bits.min(24), info: InstructionInfoFactory::new() }
    }

    fn record(&self, mem: &iced_x86::UsedMemory, write: bool) -> Option<Snippet> {
        if mem.index() != Register::None && !mem.index().is_gpr() {
            return None; // VSIB (gathers/scatters): no single address
        }
        let base = mem.base();
        let m = MemoryOperand::new(
            base,
            mem.index(),
            mem.scale().max(1),
            mem.displacement() as i64,
            if base == Register::RIP {
                8
            } else if mem.displacement() == 0 {
                0
            } else {
                4
            },
            false,
            Register::None,
        );
        let size = mem.memory_size().size() as u64;
        let info = (size | ((write as u64) << 16)) as i64;
        let mask = (1u32 << self.ring_bits) - 1;
        let mut code = Vec::new();
        let lea = if base.is_gpr32() || mem.index().is_gpr32() {
            Instruction::with2(Code::Lea_r32_m, Register::EAX, m).ok()?
        } else {
            Instruction::with2(Code::Lea_r64_m, Register::RAX, m).ok()?
        };
        // Operands lea cannot express (e.g. 64-bit absolute displacements) are
        // skipped rather than failing the block.
        let probe_at = if base == Register::RIP { mem.displacement() } else { 0 };
        if iced_x86::Encoder::new(64).encode(&lea, probe_at).is_err() {
            return None;
        }
        code.push(lea);
        code.push(Instruction::with2(Code::Mov_r64_rm64, Register::RCX, client_slot(MEMTRACE_COUNT_SLOT)).ok()?);
        code.push(Instruction::with2(Code::Add_rm64_imm8, client_slot(MEMTRACE_COUNT_SLOT), 1i32).ok()?);
        code.push(Instruction::with2(Code::And_rm32_imm32, Register::ECX, mask).ok()?);
        code.push(Instruction::with2(Code::Shl_rm32_imm8, Register::ECX, 4u32).ok()?);
        code.push(Instruction::with2(Code::Add_r64_rm64, Register::RCX, client_slot(MEMTRACE_BASE_SLOT)).ok()?);
        code.push(Instruction::with2(Code::Mov_rm64_r64, MemoryOperand::with_base(Register::RCX), Register::RAX).ok()?);
        code.push(
            Instruction::with2(Code::Mov_rm64_imm32, MemoryOperand::with_base_displ(Register::RCX, 8), info as i32)
                .ok()?,
        );
        Some(Snippet { code, clobbers: alloc::vec![Register::RAX, Register::RCX], clobbers_flags: true })
    }
}

impl Client for MemTrace {
    fn instrument(&mut self, b: &BlockInfo<'_>, o: &mut Inserts) {
        for (idx, ins) in b.insns.iter().enumerate() {
            if ins.code() == Code::Lea_r64_m
                || ins.code() == Code::Lea_r32_m
                || ins.mnemonic() == iced_x86::Mnemonic::Nop
            {
                continue;
            }
            let mems: Vec<iced_x86::UsedMemory> = self.info.info(ins).used_memory().to_vec();
            for m in mems.iter() {
                let write = match m.access() {
                    OpAccess::Read | OpAccess::CondRead => false,
                    OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite => true,
                    _ => continue,
                };
                if let Some(s) = self.record(m, write) {
                    o.insert(Where::Before(idx), s);
                }
            }
        }
    }
}
