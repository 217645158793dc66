//! Makes the built filter safe to compile with the Cranelift of wasmtime 0.38.1, the runtime that
//! api7/wasm-nginx-module (and so APISIX) pins.
//!
//! That Cranelift (0.85) miscompiles a memory access whose address is `i32.shl x c` with a
//! constant `c` of 1, 2 or 3: its x64 backend folds the shift into the addressing mode
//! `[heap_base + zext(x) << c]`, computed in 64 bits, so the high bits of `x` that the 32-bit
//! shift drops are added to the address (up to 4, 12 or 28 GiB too far). Upstream fixed it in
//! wasmtime 4.0.1/5.0.1/6.0.1 (CVE-2023-26489, GHSA-ff4p-7xrq-q5r8). Correct wasm reaches it:
//! LLVM knows those bits are dropped and leaves garbage in them. itoa's digit-pair lookup computes
//! `(n - 100 * q) * 2` as `((q * 0x7FFF_FF9C + n) << 1)`, whose bit 31 is set whenever `q` is
//! odd: serde_json's integer formatting trapped for every Unix time with an odd hundreds digit.
//!
//! The pattern is not only in itoa (every lookup into a static table of 2-, 4- or 8-byte entries
//! has it), so the fix is global: every `i32.const c; i32.shl` with `c & 31` in 1..=3 becomes
//! `i32.const (1 << c); i32.mul`, which is the same operation in wasm and which Cranelift 0.85
//! does not fold into an address. The patch is in place (same byte length: both constants are
//! one-byte LEB128, both opcodes one byte), so nothing else in the module moves. It has to be the
//! last step of the build: wasm-opt turns multiplications by powers of two back into shifts.
//!
//! [`findings`] is the check: it reports every shift that Cranelift 0.85 can still see as a shift
//! by a small constant, including through locals (its SSA construction turns a local that holds
//! a constant into that constant).

use std::fmt;

use wasmparser::{Operator, Parser, Payload, Validator};

const I32_CONST: u8 = 0x41;
const I32_SHL: u8 = 0x74;
const I32_MUL: u8 = 0x6c;

/// A shift that Cranelift 0.85 would fold into an x64 addressing mode if its result is an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// `i32.const amount; i32.shl` at this offset of the `i32.shl`.
    ConstShift { offset: usize, amount: u32 },
    /// `local.get/tee local; i32.shl` where that local may hold a small constant shift amount.
    LocalShift { offset: usize, local: u32 },
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::ConstShift { offset, amount } => {
                write!(f, "0x{offset:x}: i32.shl by the constant {amount}")
            }
            Finding::LocalShift { offset, local } => {
                write!(f, "0x{offset:x}: i32.shl by local {local}, which may hold a constant 1..=3")
            }
        }
    }
}

/// An error reading or patching a module.
#[derive(Debug)]
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<wasmparser::BinaryReaderError> for Error {
    fn from(e: wasmparser::BinaryReaderError) -> Self {
        Error(format!("invalid wasm: {e}"))
    }
}

/// The shift amounts that Cranelift 0.85 folds (`c & 31`, as wasm masks the amount).
fn is_small_shift(value: i32) -> bool {
    matches!(value & 31, 1..=3)
}

/// One `i32.const c; i32.shl` site: the offset of the `i32.const` and of the `i32.shl`.
struct ConstSite {
    const_at: usize,
    shl_at: usize,
    amount: u32,
}

/// Everything found in one pass over the code section.
#[derive(Default)]
struct Scan {
    const_sites: Vec<ConstSite>,
    local_shifts: Vec<Finding>,
}

fn scan(module: &[u8]) -> Result<Scan, Error> {
    let mut out = Scan::default();
    let mut type_params: Vec<u32> = Vec::new();
    let mut func_types: Vec<u32> = Vec::new();
    let mut bodies = 0usize;
    for payload in Parser::new(0).parse_all(module) {
        match payload? {
            Payload::TypeSection(types) => {
                for ty in types.into_iter_err_on_gc_types() {
                    type_params.push(u32::try_from(ty?.params().len()).unwrap_or(u32::MAX));
                }
            }
            Payload::FunctionSection(funcs) => {
                for f in funcs {
                    func_types.push(f?);
                }
            }
            Payload::CodeSectionEntry(body) => {
                let params = func_types
                    .get(bodies)
                    .and_then(|t| type_params.get(*t as usize))
                    .copied()
                    .ok_or_else(|| Error(format!("function body {bodies} has no type")))?;
                bodies += 1;
                scan_function(&body, params, &mut out)?;
            }
            _ => {}
        }
    }
    Ok(out)
}

fn scan_function(body: &wasmparser::FunctionBody<'_>, params: u32, out: &mut Scan) -> Result<(), Error> {
    let mut locals = params as usize;
    for decl in body.get_locals_reader()? {
        let (count, _) = decl?;
        locals = locals.saturating_add(count as usize);
    }
    let mut ops = Vec::new();
    let mut reader = body.get_operators_reader()?;
    while !reader.eof() {
        ops.push(reader.read_with_offset()?);
    }
    let code: Vec<&Operator<'_>> = ops.iter().map(|(op, _)| op).collect();
    let amounts = local_amounts(&code, params as usize, locals);

    for (i, pair) in ops.windows(2).enumerate() {
        let [(prev, prev_at), (Operator::I32Shl, shl_at)] = pair else { continue };
        match prev {
            Operator::I32Const { value } if is_small_shift(*value) => {
                out.const_sites.push(ConstSite {
                    const_at: *prev_at,
                    shl_at: *shl_at,
                    amount: (*value & 31).unsigned_abs(),
                });
            }
            Operator::LocalGet { local_index } | Operator::LocalTee { local_index } => {
                let small = match &amounts {
                    None => true,
                    Some(at) => matches!(at.get(i), Some(Val::Const(c)) if is_small_shift(*c)),
                };
                if small {
                    out.local_shifts.push(Finding::LocalShift { offset: *shl_at, local: *local_index });
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// What a local holds in Cranelift's SSA form at some point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Val {
    /// No path reaches this point.
    Unreached,
    /// The same constant on every path: cranelift-frontend's SSA construction drops a block
    /// parameter whose incoming values are all one value, so a read gives that `iconst`.
    Const(i32),
    /// Anything else: computed, a parameter, or a merge of different values (a block parameter).
    Other,
}

impl Val {
    fn meet(self, other: Val) -> Val {
        match (self, other) {
            (Val::Unreached, v) | (v, Val::Unreached) => v,
            (Val::Const(a), Val::Const(b)) if a == b => Val::Const(a),
            _ => Val::Other,
        }
    }
}

fn meet_into(into: &mut Vec<Val>, from: &[Val]) {
    if into.is_empty() {
        into.extend_from_slice(from);
        return;
    }
    for (a, b) in into.iter_mut().zip(from) {
        *a = a.meet(*b);
    }
}

enum FrameKind {
    Block,
    If { else_state: Vec<Val>, has_else: bool },
    Loop { opener: usize, header: Vec<Val> },
}

struct Frame {
    kind: FrameKind,
    /// The merge of the states branching to this label (the end of a block or `if`, the header
    /// of a loop). Empty: no branch yet.
    label: Vec<Val>,
}

/// Constant propagation of the locals over one body, the way cranelift-frontend builds SSA:
/// for each operator index, the value of the local that a `local.get`/`local.tee` there reads
/// (after the tee). `None` when the body has control flow this does not model (exceptions,
/// typed-reference branches): then every local shift amount counts as possibly constant.
fn local_amounts(code: &[&Operator<'_>], params: usize, locals: usize) -> Option<Vec<Val>> {
    // Parameters are unknown; declared locals start at zero.
    let highest = locals;
    let mut state: Vec<Val> = (0..locals).map(|i| if i < params { Val::Other } else { Val::Const(0) }).collect();

    let mut reads = vec![Val::Unreached; code.len()];
    let mut frames: Vec<Frame> = vec![Frame { kind: FrameKind::Block, label: Vec::new() }];
    let unreached = |n: usize| vec![Val::Unreached; n];
    let mut i = 0usize;
    let mut steps = 0usize;
    while let Some(op) = code.get(i) {
        steps += 1;
        if steps > 50 * code.len() + 1000 {
            return None;
        }
        let top_value = |state: &Vec<Val>| -> Val {
            match i.checked_sub(1).and_then(|p| code.get(p)) {
                Some(Operator::I32Const { value }) => Val::Const(*value),
                Some(Operator::LocalGet { local_index }) | Some(Operator::LocalTee { local_index }) => {
                    state.get(*local_index as usize).copied().unwrap_or(Val::Other)
                }
                _ => Val::Other,
            }
        };
        let branch = |frames: &mut Vec<Frame>, depth: u32, state: &Vec<Val>| -> Option<()> {
            let k = frames.len().checked_sub(depth as usize + 1)?;
            let frame = frames.get_mut(k)?;
            meet_into(&mut frame.label, state);
            Some(())
        };
        match op {
            Operator::LocalGet { local_index } => {
                if let Some(slot) = reads.get_mut(i) {
                    *slot = state.get(*local_index as usize).copied().unwrap_or(Val::Other);
                }
            }
            Operator::LocalSet { local_index } | Operator::LocalTee { local_index } => {
                let v = top_value(&state);
                let reached = state.iter().any(|v| *v != Val::Unreached) || state.is_empty();
                if let Some(slot) = state.get_mut(*local_index as usize) {
                    *slot = if reached { v } else { Val::Unreached };
                }
                if let Some(slot) = reads.get_mut(i) {
                    *slot = state.get(*local_index as usize).copied().unwrap_or(Val::Other);
                }
            }
            Operator::Block { .. } => frames.push(Frame { kind: FrameKind::Block, label: Vec::new() }),
            Operator::If { .. } => frames
                .push(Frame { kind: FrameKind::If { else_state: state.clone(), has_else: false }, label: Vec::new() }),
            Operator::Loop { .. } => {
                frames.push(Frame { kind: FrameKind::Loop { opener: i, header: state.clone() }, label: Vec::new() });
            }
            Operator::Else => {
                let frame = frames.last_mut()?;
                meet_into(&mut frame.label, &state);
                let FrameKind::If { else_state, has_else } = &mut frame.kind else { return None };
                *has_else = true;
                state = std::mem::take(else_state);
            }
            Operator::End => {
                let mut frame = frames.pop()?;
                match &mut frame.kind {
                    FrameKind::Block => {
                        meet_into(&mut frame.label, &state);
                        state = frame.label;
                    }
                    FrameKind::If { else_state, has_else } => {
                        meet_into(&mut frame.label, &state);
                        if !*has_else {
                            meet_into(&mut frame.label, else_state);
                        }
                        state = frame.label;
                    }
                    FrameKind::Loop { opener, header } => {
                        let mut merged = header.clone();
                        meet_into(&mut merged, &frame.label);
                        if merged != *header {
                            // The back edges changed the header: run the body again from it.
                            let opener = *opener;
                            state = merged.clone();
                            frames.push(Frame { kind: FrameKind::Loop { opener, header: merged }, label: Vec::new() });
                            i = opener + 1;
                            continue;
                        }
                        // Falling out of the loop keeps the state of the end of its body.
                    }
                }
                if state.is_empty() {
                    state = unreached(highest);
                }
            }
            Operator::Br { relative_depth } => {
                branch(&mut frames, *relative_depth, &state)?;
                state = unreached(highest);
            }
            Operator::BrIf { relative_depth } => branch(&mut frames, *relative_depth, &state)?,
            Operator::BrTable { targets } => {
                branch(&mut frames, targets.default(), &state)?;
                for t in targets.targets() {
                    branch(&mut frames, t.ok()?, &state)?;
                }
                state = unreached(highest);
            }
            Operator::Return
            | Operator::Unreachable
            | Operator::ReturnCall { .. }
            | Operator::ReturnCallIndirect { .. }
            | Operator::ReturnCallRef { .. } => state = unreached(highest),
            Operator::Try { .. }
            | Operator::TryTable { .. }
            | Operator::Catch { .. }
            | Operator::CatchAll
            | Operator::Delegate { .. }
            | Operator::Throw { .. }
            | Operator::ThrowRef
            | Operator::Rethrow { .. }
            | Operator::BrOnNull { .. }
            | Operator::BrOnNonNull { .. }
            | Operator::BrOnCast { .. }
            | Operator::BrOnCastFail { .. } => return None,
            _ => {}
        }
        // A loop's header: entering it starts from the header state (set when pushed).
        if let (Operator::Loop { .. }, Some(Frame { kind: FrameKind::Loop { header, .. }, .. })) = (op, frames.last()) {
            state = header.clone();
        }
        i += 1;
    }
    Some(reads)
}

/// Every shift in `module` that Cranelift 0.85 may fold into an address. Empty after [`fix`]
/// unless a shift amount comes through a local (which [`fix`] does not rewrite).
pub fn findings(module: &[u8]) -> Result<Vec<Finding>, Error> {
    let scan = scan(module)?;
    let mut all: Vec<Finding> =
        scan.const_sites.iter().map(|s| Finding::ConstShift { offset: s.shl_at, amount: s.amount }).collect();
    all.extend(scan.local_shifts);
    Ok(all)
}

/// Signed LEB128 of a small non-negative `value` in exactly `len` bytes (padded).
fn sleb_padded(value: u8, len: usize) -> Option<Vec<u8>> {
    if value >= 0x40 || len == 0 || len > 5 {
        return None;
    }
    let mut bytes = vec![0x80; len];
    let (first, last) = (bytes.first_mut()?, len - 1);
    *first = if last == 0 { value } else { value | 0x80 };
    if last > 0 {
        *bytes.get_mut(last)? = 0x00;
    }
    Some(bytes)
}

/// Rewrites every `i32.const c; i32.shl` (c & 31 in 1..=3) into `i32.const (1 << c); i32.mul`
/// in place, validates the result and returns how many it rewrote.
pub fn fix(module: &mut [u8]) -> Result<usize, Error> {
    let sites = scan(module)?.const_sites;
    for site in &sites {
        let imm_len = site.shl_at.saturating_sub(site.const_at + 1);
        let factor = 1u8 << site.amount;
        let imm = sleb_padded(factor, imm_len)
            .ok_or_else(|| Error(format!("0x{:x}: unexpected i32.const encoding", site.const_at)))?;
        if module.get(site.const_at) != Some(&I32_CONST) || module.get(site.shl_at) != Some(&I32_SHL) {
            return Err(Error(format!("0x{:x}: not i32.const; i32.shl", site.const_at)));
        }
        let dst = module
            .get_mut(site.const_at + 1..site.shl_at)
            .ok_or_else(|| Error(format!("0x{:x}: out of range", site.const_at)))?;
        dst.copy_from_slice(&imm);
        if let Some(op) = module.get_mut(site.shl_at) {
            *op = I32_MUL;
        }
    }
    Validator::new().validate_all(module)?;
    Ok(sites.len())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use wasm_encoder::{
        CodeSection, ExportKind, ExportSection, Function, FunctionSection, Instruction as I, MemArg, MemorySection,
        MemoryType, Module, TypeSection, ValType,
    };

    fn module(locals: u32, body: &[I<'_>]) -> Vec<u8> {
        let mut m = Module::new();
        let mut types = TypeSection::new();
        types.ty().function([ValType::I32], [ValType::I32]);
        m.section(&types);
        let mut funcs = FunctionSection::new();
        funcs.function(0);
        m.section(&funcs);
        let mut mems = MemorySection::new();
        mems.memory(MemoryType { minimum: 1, maximum: None, memory64: false, shared: false, page_size_log2: None });
        m.section(&mems);
        let mut exports = ExportSection::new();
        exports.export("f", ExportKind::Func, 0);
        m.section(&exports);
        let mut code = CodeSection::new();
        let mut f = Function::new([(locals, ValType::I32)]);
        for i in body {
            f.instruction(i);
        }
        f.instruction(&I::End);
        code.function(&f);
        m.section(&code);
        m.finish()
    }

    const LOAD: MemArg = MemArg { offset: 16, align: 1, memory_index: 0 };

    fn ops(module: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for p in Parser::new(0).parse_all(module) {
            if let Payload::CodeSectionEntry(body) = p.unwrap() {
                let mut r = body.get_operators_reader().unwrap();
                while !r.eof() {
                    out.push(format!("{:?}", r.read().unwrap()));
                }
            }
        }
        out
    }

    #[test]
    fn rewrites_small_constant_shifts_into_multiplications() {
        for (amount, factor) in [(1, 2), (2, 4), (3, 8), (33, 2), (-31, 2)] {
            let mut m = module(0, &[I::LocalGet(0), I::I32Const(amount), I::I32Shl, I::I32Load16U(LOAD)]);
            let len = m.len();
            assert_eq!(findings(&m).unwrap().len(), 1, "amount {amount}");
            assert_eq!(fix(&mut m).unwrap(), 1);
            assert_eq!(m.len(), len);
            let ops = ops(&m);
            assert!(ops.contains(&format!("I32Const {{ value: {factor} }}")), "{ops:?}");
            assert!(ops.contains(&"I32Mul".to_string()), "{ops:?}");
            assert!(!ops.contains(&"I32Shl".to_string()), "{ops:?}");
            assert_eq!(findings(&m).unwrap(), vec![]);
        }
    }

    #[test]
    fn leaves_other_shifts_alone() {
        for amount in [0, 4, 5, 31, 32] {
            let mut m = module(0, &[I::LocalGet(0), I::I32Const(amount), I::I32Shl]);
            let before = m.clone();
            assert_eq!(findings(&m).unwrap(), vec![]);
            assert_eq!(fix(&mut m).unwrap(), 0);
            assert_eq!(m, before);
        }
        // A variable amount, and a constant that is not the amount (it is shifted).
        let mut m = module(0, &[I::I32Const(2), I::LocalGet(0), I::I32Shl]);
        assert_eq!(fix(&mut m).unwrap(), 0);
    }

    #[test]
    fn patches_a_padded_constant_keeping_its_length() {
        let mut m = module(0, &[I::LocalGet(0), I::I32Const(3), I::I32Shl]);
        // Re-encode `i32.const 3` as a padded 3-byte LEB128 (0x83 0x80 0x00): the body
        // and section sizes grow by 2.
        let at = m.windows(3).position(|w| w == [I32_CONST, 3, I32_SHL]).unwrap();
        m.splice(at + 1..at + 2, [0x83, 0x80, 0x00]);
        // ... 0x0a section-size 1 body-size [1 (0 i32)] [local.get 0] i32.const 3 i32.shl
        assert_eq!(m[at - 9], 0x0a);
        assert_eq!(&m[at - 7..at], &[1, m[at - 6], 1, 0, 0x7f, 0x20, 0]);
        m[at - 6] += 2;
        m[at - 8] += 2;
        assert_eq!(findings(&m).unwrap().len(), 1);
        assert_eq!(fix(&mut m).unwrap(), 1);
        assert_eq!(&m[at..at + 5], &[I32_CONST, 0x88, 0x80, 0x00, I32_MUL]);
    }

    /// `local.tee 1` of a computed value, then an `if` whose body leaves, then `x << local 1`;
    /// `then_body` runs in the `if`.
    fn shift_by_local_after_if(then_body: &[I<'static>]) -> Vec<u8> {
        let mut body = vec![
            I::I32Const(1),
            I::LocalSet(1), // an earlier constant definition, not the one that reaches
            I::LocalGet(0),
            I::I32Const(24),
            I::I32Sub,
            I::LocalTee(1),
            I::Drop,
            I::LocalGet(0),
            I::If(wasm_encoder::BlockType::Empty),
        ];
        body.extend_from_slice(then_body);
        body.extend([I::End, I::LocalGet(0), I::LocalGet(1), I::I32Shl, I::I32Load(LOAD)]);
        module(1, &body)
    }

    #[test]
    fn follows_a_local_to_the_definitions_that_reach_the_shift() {
        // The body returns: only the computed value reaches the shift.
        let m = shift_by_local_after_if(&[I::LocalGet(0), I::Return]);
        assert_eq!(findings(&m).unwrap(), vec![]);
        // The body sets a constant and falls through: a merge of two values, a block
        // parameter in Cranelift, not a constant.
        let m = shift_by_local_after_if(&[I::I32Const(2), I::LocalSet(1)]);
        assert_eq!(findings(&m).unwrap(), vec![]);
        // The body sets a constant and returns: still only the computed value reaches.
        let m = shift_by_local_after_if(&[I::I32Const(2), I::LocalSet(1), I::LocalGet(0), I::Return]);
        assert_eq!(findings(&m).unwrap(), vec![]);
        // A constant set in the body that branches to the end of the `if`: reaches (a merge
        // with the computed value, so still not constant)...
        let m = shift_by_local_after_if(&[
            I::I32Const(2),
            I::LocalSet(1),
            I::LocalGet(0),
            I::BrIf(0),
            I::LocalGet(0),
            I::Return,
        ]);
        assert_eq!(findings(&m).unwrap(), vec![]);
        // ...but when every path sets the same constant, Cranelift sees that constant.
        let m = module(
            1,
            &[
                I::I32Const(2),
                I::LocalSet(1),
                I::LocalGet(0),
                I::If(wasm_encoder::BlockType::Empty),
                I::I32Const(2),
                I::LocalSet(1),
                I::End,
                I::LocalGet(0),
                I::LocalGet(1),
                I::I32Shl,
                I::I32Load(LOAD),
            ],
        );
        assert_eq!(findings(&m).unwrap().len(), 1);
    }

    /// `local 1 = 3`, then a loop that shifts by it, and `changes` at the end of the loop body,
    /// which branches back.
    fn shift_in_loop(changes: &[I<'static>]) -> Vec<u8> {
        let mut body = vec![
            I::I32Const(3),
            I::LocalSet(1),
            I::Loop(wasm_encoder::BlockType::Empty),
            I::LocalGet(0),
            I::LocalGet(1),
            I::I32Shl,
            I::I32Load(LOAD),
            I::Drop,
        ];
        body.extend_from_slice(changes);
        body.extend([I::LocalGet(0), I::BrIf(0), I::End, I::LocalGet(0)]);
        module(1, &body)
    }

    #[test]
    fn follows_a_local_around_loops() {
        assert_eq!(findings(&shift_in_loop(&[])).unwrap().len(), 1);
        assert_eq!(findings(&shift_in_loop(&[I::I32Const(3), I::LocalSet(1)])).unwrap().len(), 1);
        let computed = [I::LocalGet(1), I::I32Const(1), I::I32Add, I::LocalSet(1)];
        assert_eq!(findings(&shift_in_loop(&computed)).unwrap(), vec![]);
        // A parameter is never a constant.
        let m = module(0, &[I::LocalGet(0), I::LocalGet(0), I::I32Shl, I::I32Load(LOAD)]);
        assert_eq!(findings(&m).unwrap(), vec![]);
    }

    #[test]
    fn reports_a_constant_amount_held_in_a_local() {
        let m = module(
            2,
            &[
                I::I32Const(1),
                I::LocalSet(1),
                I::LocalGet(1),
                I::LocalSet(2),
                I::LocalGet(0),
                I::LocalGet(2),
                I::I32Shl,
                I::I32Load(LOAD),
            ],
        );
        let mut fixed = m.clone();
        assert_eq!(fix(&mut fixed).unwrap(), 0);
        assert!(matches!(findings(&fixed).unwrap()[..], [Finding::LocalShift { local: 2, .. }]));
    }
}
