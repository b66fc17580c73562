//! The WebAssembly codec host (ABI v1, `docs/codec-abi.md`).
//!
//! A [`CodecRuntime`] holds the pool's one `wasmtime::Engine` and compiled `Module`,
//! checked against the ABI at load, plus, for a codec with a time budget (one loaded
//! from a file, unless configured otherwise), a ticker thread that advances the
//! engine's epoch so every call into it is stopped when it overruns. Each connection's
//! worker thread owns one [`CodecInstance`] (its own `Store` and `Instance`, with a
//! memory limit), so a codec that traps, loops or hoards memory fails only that
//! connection.

mod builtin;
mod engine_config;
mod records;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use wasmtime::{
    Caller, Engine, ExternType, FuncType, InstancePre, Linker, Memory, Module, Store, StoreLimits,
    StoreLimitsBuilder, Trap, TypedFunc, ValType,
};

pub(crate) use records::{kind, op, RecordIter, Records};

use crate::config::{BuiltinCodec, CodecConfig};
use crate::error::{Error, Result};

/// The ABI version this engine speaks.
pub const ABI_VERSION: i32 = 1;

/// How often the epoch advances: the granularity of the per-call time budget.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Most elements in one of an instance's tables. Tables live in host memory (eight
/// bytes an element), outside the linear memory the memory limit bounds, so without
/// this one `table.grow` could take gigabytes; a codec compiled from Rust needs a few
/// hundred.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// Optional exports: the bounds of the codec's shadow stack (wasm-ld defines both;
/// `--export=__stack_low --export=__stack_high` exports them), which holds nothing
/// between calls. An idle connection gives its pages back (docs/codec-abi.md).
const STACK_LOW: &str = "__stack_low";
const STACK_HIGH: &str = "__stack_high";

/// Optional export `(i32) -> ()`: called once before `wirepool_init` with the ABI v1
/// extensions this engine understands, so that a codec uses them only where it may
/// (an engine that predates the export never calls it: the codec uses none).
const ENGINE_FEATURES_EXPORT: &str = "wirepool_engine_features";

/// The extensions this engine understands (bits of `wirepool_engine_features`'
/// argument, docs/codec-abi.md).
pub(crate) mod feature {
    /// `DATA_IN_INPUT` records in `wirepool_decode`'s output.
    pub(crate) const DATA_IN_INPUT: i32 = 1;
    /// All of the above.
    pub(crate) const ALL: i32 = DATA_IN_INPUT;
}

/// Where a codec module comes from.
#[derive(Debug, Clone)]
pub(crate) enum CodecSource {
    Builtin(BuiltinCodec),
    File(String),
}

impl CodecSource {
    pub fn from_config(config: &CodecConfig) -> CodecSource {
        match &config.path {
            Some(path) => CodecSource::File(path.clone()),
            None => CodecSource::Builtin(config.builtin),
        }
    }

    fn describe(&self) -> String {
        match self {
            CodecSource::Builtin(builtin) => format!("builtin codec {builtin:?}"),
            CodecSource::File(path) => format!("codec {path}"),
        }
    }
}

/// Limits applied to every instance.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CodecLimits {
    /// The time budget of one call; `None`: none, and the code compiled without the
    /// checks a budget needs.
    pub max_call: Option<Duration>,
    pub max_memory_bytes: usize,
}

/// Host state inside each Store.
pub(crate) struct HostState {
    limits: StoreLimits,
    connection_id: u64,
}

/// Advances the engine's epoch until dropped.
struct EpochTicker {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine) -> Result<EpochTicker> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("wirepool-epoch".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                let (flag, wake) = &*thread_stop;
                let mut stopped = flag.lock();
                while !*stopped {
                    wake.wait_for(&mut stopped, EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .map_err(|err| Error::Io(format!("spawning the codec epoch thread: {err}")))?;
        Ok(EpochTicker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        let (flag, wake) = &*self.stop;
        *flag.lock() = true;
        wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An engine with one compiled module, shared by every pool of the process that loads
/// the same module bytes (each instance's memory limit is its store's): compiling
/// takes about 100 ms (and touches some 9 MB of compiler code pages), loading a
/// built-in codec's precompiled artifact about 1 ms, instantiating well under one.
/// An interruptible one's epoch ticker runs while some pool uses it.
struct Compiled {
    engine: Engine,
    module: Module,
    /// Loaded from the artifact `build.rs` made (a built-in codec), not compiled here.
    from_artifact: bool,
    /// Compiled with epoch checks: calls can be stopped (codecs with a time budget).
    interruptible: bool,
    ticker: Mutex<std::sync::Weak<EpochTicker>>,
}

/// Most compiled modules kept for reuse (the oldest unused one goes first).
const COMPILED_CACHE: usize = 8;

/// One cached module: its bytes, whether it was compiled interruptible, and the result.
type CompiledEntry = (Arc<[u8]>, bool, Arc<Compiled>);

/// The process's compiled modules, least recently used first.
static COMPILED: Mutex<Vec<CompiledEntry>> = Mutex::new(Vec::new());

impl Compiled {
    /// The compiled module for `bytes`, from the cache, from `precompiled` (what
    /// `build.rs` compiled from these bytes, not interruptible) if it fits, or compiled
    /// now.
    fn get(
        bytes: &[u8],
        name: &str,
        precompiled: Option<builtin::Precompiled>,
        interruptible: bool,
    ) -> Result<Arc<Compiled>> {
        let mut cache = COMPILED.lock();
        if let Some(at) = cache
            .iter()
            .position(|(cached, kind, _)| *kind == interruptible && **cached == *bytes)
        {
            // Most recently used last.
            let entry = cache.remove(at);
            let compiled = Arc::clone(&entry.2);
            cache.push(entry);
            return Ok(compiled);
        }
        // Compiled under the lock: two pools loading one codec at once compile it once.
        let started = std::time::Instant::now();
        let precompiled = precompiled.filter(|_| !interruptible);
        let compiled = Arc::new(Compiled::load(bytes, name, precompiled, interruptible)?);
        log::debug!(
            target: "wirepool::codec",
            "{name}: {} in {:.1} ms",
            if compiled.from_artifact { "loaded precompiled" } else { "compiled" },
            started.elapsed().as_secs_f64() * 1000.0
        );
        if cache.len() == COMPILED_CACHE {
            cache.remove(0);
        }
        cache.push((Arc::from(bytes), interruptible, Arc::clone(&compiled)));
        Ok(compiled)
    }

    fn load(
        bytes: &[u8],
        name: &str,
        precompiled: Option<builtin::Precompiled>,
        interruptible: bool,
    ) -> Result<Compiled> {
        let config = engine_config::engine_config(interruptible);
        let engine_error =
            |err: wasmtime::Error| Error::Codec(format!("{name}: creating the engine: {err:#}"));
        let engine = Engine::new(&config).map_err(engine_error)?;
        if let Some(artifact) = precompiled {
            match deserialize(&engine, artifact) {
                Ok(module) => {
                    check_shape(&module).map_err(|text| Error::Codec(format!("{name}: {text}")))?;
                    return Ok(Compiled::new(engine, module, true, interruptible));
                }
                Err(err) => log::warn!(
                    target: "wirepool::codec",
                    "{name}: the module precompiled when this library was built does not fit \
                     here ({err:#}); compiling it instead (about 100 ms and 6 MB, once per \
                     process)"
                ),
            }
        }
        let compiler = engine;
        let module = Module::new(&compiler, bytes)
            .map_err(|err| Error::Codec(format!("{name}: not a valid module: {err:#}")))?;
        check_shape(&module).map_err(|text| Error::Codec(format!("{name}: {text}")))?;
        // The compiling engine keeps cranelift's scratch buffers for its next compile
        // (about 2 MB); the pools only ever run this module. So the compiled code moves
        // to an engine that never compiles, the compiler goes, and the freed heap goes
        // back to the system.
        let image = module.serialize().map_err(|err| {
            Error::Codec(format!("{name}: serialising the compiled module: {err:#}"))
        })?;
        drop((module, compiler));
        let engine = Engine::new(&config).map_err(engine_error)?;
        // SAFETY: `image` is what `serialize` produced a moment ago in this process,
        // for an engine with this very configuration: exactly what `deserialize`
        // requires (it still checks the engine and the image's format).
        let module = unsafe { Module::deserialize(&engine, &image) }
            .map_err(|err| Error::Codec(format!("{name}: loading the compiled module: {err:#}")))?;
        drop(image);
        // glibc keeps freed heap for reuse; hand it back (other C libraries have no
        // such call, and need none).
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim has no preconditions.
        unsafe {
            libc::malloc_trim(0);
        }
        Ok(Compiled::new(engine, module, false, interruptible))
    }

    fn new(engine: Engine, module: Module, from_artifact: bool, interruptible: bool) -> Compiled {
        Compiled {
            engine,
            module,
            from_artifact,
            interruptible,
            ticker: Mutex::new(std::sync::Weak::new()),
        }
    }

    /// The engine's epoch ticker, started if no pool holds it; `None` when the code
    /// is not interruptible (nothing would look at the epoch).
    fn ticker(&self) -> Result<Option<Arc<EpochTicker>>> {
        if !self.interruptible {
            return Ok(None);
        }
        let mut slot = self.ticker.lock();
        if let Some(ticker) = slot.upgrade() {
            return Ok(Some(ticker));
        }
        let ticker = Arc::new(EpochTicker::start(self.engine.clone())?);
        *slot = Arc::downgrade(&ticker);
        Ok(Some(ticker))
    }
}

/// One compiled codec, shared by every connection of a pool.
pub(crate) struct CodecRuntime {
    engine: Engine,
    instance_pre: InstancePre<HostState>,
    limits: CodecLimits,
    config_json: Vec<u8>,
    // Guards the auth token handed to new instances (replaced by token rotation).
    token: parking_lot::Mutex<Vec<u8>>,
    name: String,
    /// Loaded from the artifact build.rs made, not compiled in this process (the
    /// tests look).
    #[cfg(test)]
    from_artifact: bool,
    /// Advances the epoch while this runtime lives (codecs with a time budget).
    _ticker: Option<Arc<EpochTicker>>,
}

/// The exports every codec must have, with their exact signatures.
fn required_exports() -> Vec<(&'static str, Vec<ValType>, Vec<ValType>)> {
    use ValType::{I32, I64};
    vec![
        ("wirepool_abi_version", vec![], vec![I32]),
        ("wirepool_buffer", vec![I32], vec![I32]),
        ("wirepool_init", vec![I32, I32], vec![I32]),
        ("wirepool_open", vec![], vec![I32]),
        ("wirepool_decode", vec![I32, I32], vec![I32]),
        ("wirepool_encode", vec![I32, I64, I32, I32], vec![I32]),
        ("wirepool_tick", vec![I64], vec![I32]),
        ("wirepool_output", vec![], vec![I64]),
    ]
}

fn signature_text(params: &[ValType], results: &[ValType]) -> String {
    let list = |types: &[ValType]| {
        types
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!("({}) -> ({})", list(params), list(results))
}

fn func_signature(func: &FuncType) -> String {
    let params: Vec<ValType> = func.params().collect();
    let results: Vec<ValType> = func.results().collect();
    signature_text(&params, &results)
}

fn same_types(left: &[ValType], right: impl Iterator<Item = ValType>) -> bool {
    let right: Vec<ValType> = right.collect();
    left.len() == right.len() && left.iter().zip(&right).all(|(a, b)| ValType::eq(a, b))
}

/// Checks a module's imports and exports against ABI v1; the error names the culprit.
fn check_shape(module: &Module) -> std::result::Result<(), String> {
    for import in module.imports() {
        let name = format!("{}.{}", import.module(), import.name());
        let allowed = import.module() == "wirepool" && import.name() == "log";
        if !allowed {
            return Err(format!(
                "imports {name}, but a codec may import only wirepool.log"
            ));
        }
        match import.ty() {
            ExternType::Func(func)
                if same_types(&[ValType::I32, ValType::I32, ValType::I32], func.params())
                    && func.results().len() == 0 => {}
            other => {
                return Err(format!(
                    "imports wirepool.log as {}, expected a function (i32, i32, i32) -> ()",
                    describe_extern(&other)
                ))
            }
        }
    }
    match module.get_export("memory") {
        Some(ExternType::Memory(_)) => {}
        Some(other) => {
            return Err(format!(
                "exports memory as {}, expected a memory",
                describe_extern(&other)
            ))
        }
        None => return Err("does not export memory".into()),
    }
    check_stack_exports(module)?;
    match module.get_export(ENGINE_FEATURES_EXPORT) {
        None => {}
        Some(ExternType::Func(func))
            if same_types(&[ValType::I32], func.params()) && func.results().len() == 0 => {}
        Some(other) => {
            return Err(format!(
                "export {ENGINE_FEATURES_EXPORT} is {}, expected a function (i32) -> () \
                 (or no such export)",
                describe_extern(&other)
            ))
        }
    }
    for (name, params, results) in required_exports() {
        match module.get_export(name) {
            Some(ExternType::Func(func)) => {
                if !same_types(&params, func.params()) || !same_types(&results, func.results()) {
                    return Err(format!(
                        "export {name} has signature {}, expected {}",
                        func_signature(&func),
                        signature_text(&params, &results)
                    ));
                }
            }
            Some(other) => {
                return Err(format!(
                    "export {name} is {}, expected a function {}",
                    describe_extern(&other),
                    signature_text(&params, &results)
                ))
            }
            None => {
                return Err(format!(
                    "does not export {name} {}",
                    signature_text(&params, &results)
                ))
            }
        }
    }
    Ok(())
}

/// Loads a built-in codec's precompiled artifact into `engine`.
fn deserialize(engine: &Engine, artifact: builtin::Precompiled) -> wasmtime::Result<Module> {
    // SAFETY: a `Precompiled` holds unmodified output of `Engine::precompile_module`
    // (build.rs made it, and it is embedded in this library): the bytes `deserialize`
    // requires. Whether it fits this engine is wasmtime's own check, which refuses
    // any mismatch: wasmtime's version, the target, cranelift's settings, a CPU
    // feature the code uses that this CPU lacks, every tunable, and wasm features
    // beyond this engine's. (build.rs's wasmtime is a build of its own: a program
    // whose wasmtime has more features gets a refusal, and compiles.)
    unsafe { Module::deserialize(engine, artifact.bytes()) }
}

/// The optional shadow-stack exports (`__stack_low`, `__stack_high`): both or
/// neither, each an immutable `i32` global.
fn check_stack_exports(module: &Module) -> std::result::Result<(), String> {
    let low = module.get_export(STACK_LOW);
    let high = module.get_export(STACK_HIGH);
    match (&low, &high) {
        (None, None) => return Ok(()),
        (Some(_), None) | (None, Some(_)) => {
            let (has, lacks) = if low.is_some() {
                (STACK_LOW, STACK_HIGH)
            } else {
                (STACK_HIGH, STACK_LOW)
            };
            return Err(format!(
                "exports {has} but not {lacks}: a shadow stack is declared by both or neither"
            ));
        }
        _ => {}
    }
    for (name, ty) in [(STACK_LOW, low), (STACK_HIGH, high)] {
        match ty {
            Some(ExternType::Global(global))
                if matches!(global.content(), ValType::I32)
                    && global.mutability() == wasmtime::Mutability::Const => {}
            Some(ExternType::Global(global)) => {
                let mutability = match global.mutability() {
                    wasmtime::Mutability::Const => "an immutable",
                    wasmtime::Mutability::Var => "a mutable",
                };
                return Err(format!(
                    "export {name} is {mutability} {} global, expected an immutable i32 global",
                    global.content()
                ));
            }
            Some(other) => {
                return Err(format!(
                    "export {name} is {}, expected an immutable i32 global",
                    describe_extern(&other)
                ))
            }
            None => unreachable!("both present"),
        }
    }
    Ok(())
}

fn describe_extern(ty: &ExternType) -> String {
    match ty {
        ExternType::Func(func) => format!("a function {}", func_signature(func)),
        ExternType::Global(_) => "a global".into(),
        ExternType::Table(_) => "a table".into(),
        ExternType::Memory(_) => "a memory".into(),
        ExternType::Tag(_) => "a tag".into(),
    }
}

/// Renders a wasmtime error from a call, naming what went wrong.
fn describe_call_error(export: &str, err: &wasmtime::Error, limits: &CodecLimits) -> String {
    match err.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => format!(
            "{export} ran longer than its {} ms budget and was stopped",
            limits.max_call.unwrap_or_default().as_millis()
        ),
        Some(Trap::StackOverflow) => format!("{export} overflowed its stack"),
        Some(trap) => format!("{export} trapped: {trap}"),
        None => {
            let text = format!("{err:#}");
            if text.contains("growing table") {
                format!("{export} grew a table past the {MAX_TABLE_ELEMENTS} element limit")
            } else if text.contains("growing memory") {
                // wasmtime: "forcing trap when growing memory to N bytes".
                format!(
                    "{export} grew its memory past the {} MiB limit",
                    limits.max_memory_bytes >> 20
                )
            } else {
                format!("{export} failed: {text}")
            }
        }
    }
}

impl CodecRuntime {
    /// Compiles and checks a codec. `config_json` is the codec's `config` value and
    /// `token` the auth token handed to every instance at init.
    pub fn load(
        source: &CodecSource,
        codec_config: &CodecConfig,
        token: Option<&str>,
    ) -> Result<CodecRuntime> {
        let (bytes, precompiled) = match source {
            CodecSource::Builtin(builtin) => (
                builtin::module_bytes(*builtin).to_vec(),
                builtin::precompiled(*builtin),
            ),
            CodecSource::File(path) => (
                crate::file_limits::read_regular_capped(
                    std::path::Path::new(path),
                    crate::file_limits::MAX_CODEC_FILE_BYTES,
                    "codec module",
                )
                .map_err(|err| Error::Codec(format!("codec.path {path}: {err}")))?,
                None,
            ),
        };
        let limits = CodecLimits {
            max_call: codec_config.max_call(),
            max_memory_bytes: usize::try_from(codec_config.max_memory_mb)
                .unwrap_or(usize::MAX >> 20)
                .saturating_mul(1 << 20),
        };
        let config_json = serde_json::to_vec(&codec_config.config)
            .map_err(|err| Error::Codec(format!("serialising codec.config: {err}")))?;
        Self::from_bytes(
            &bytes,
            precompiled,
            &source.describe(),
            limits,
            config_json,
            token.unwrap_or("").as_bytes().to_vec(),
        )
    }

    fn from_bytes(
        bytes: &[u8],
        precompiled: Option<builtin::Precompiled>,
        name: &str,
        limits: CodecLimits,
        config_json: Vec<u8>,
        token: Vec<u8>,
    ) -> Result<CodecRuntime> {
        let compiled = Compiled::get(bytes, name, precompiled, limits.max_call.is_some())?;
        let (engine, module) = (compiled.engine.clone(), &compiled.module);
        let mut linker: Linker<HostState> = Linker::new(&engine);
        linker
            .func_wrap(
                "wirepool",
                "log",
                |mut caller: Caller<'_, HostState>, level: i32, ptr: i32, len: i32| {
                    codec_log(&mut caller, level, ptr, len);
                },
            )
            .map_err(|err| Error::Codec(format!("{name}: linking wirepool.log: {err:#}")))?;
        let instance_pre = linker
            .instantiate_pre(module)
            .map_err(|err| Error::Codec(format!("{name}: {err:#}")))?;
        let ticker = compiled.ticker()?;
        let runtime = CodecRuntime {
            engine,
            instance_pre,
            limits,
            config_json,
            token: parking_lot::Mutex::new(token),
            name: name.to_string(),
            #[cfg(test)]
            from_artifact: compiled.from_artifact,
            _ticker: ticker,
        };
        // Probe the version with a throwaway instance (init is not called).
        let mut probe = runtime.raw_instance(0)?;
        let version = probe.abi_version()?;
        if version != ABI_VERSION {
            return Err(Error::Codec(format!(
                "{name}: wirepool_abi_version returned {version}, this engine speaks version {ABI_VERSION}"
            )));
        }
        Ok(runtime)
    }

    /// Replaces the token given to instances created from now on; returns the old one.
    pub fn replace_token(&self, token: Vec<u8>) -> Vec<u8> {
        std::mem::replace(&mut *self.token.lock(), token)
    }

    fn raw_instance(&self, connection_id: u64) -> Result<CodecInstance> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.limits.max_memory_bytes)
            .instances(1)
            .memories(1)
            .tables(4)
            .table_elements(MAX_TABLE_ELEMENTS)
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(
            &self.engine,
            HostState {
                limits,
                connection_id,
            },
        );
        store.limiter(|state| &mut state.limits);
        let epoch_budget = self.epoch_budget();
        if let Some(ticks) = epoch_budget {
            store.epoch_deadline_trap();
            store.set_epoch_deadline(ticks);
        }
        let name = &self.name;
        let instance = self.instance_pre.instantiate(&mut store).map_err(|err| {
            // A trap here comes from the module's own code (its start function, its
            // data and element segments): say what stopped it, like for any call.
            let text = if err.downcast_ref::<Trap>().is_some() {
                describe_call_error("instantiation", &err, &self.limits)
            } else {
                format!("instantiating: {err:#}")
            };
            Error::Codec(format!("{name}: {text}"))
        })?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| Error::Codec(format!("{name}: memory export missing")))?;
        let stack = shadow_stack(&instance, &mut store, &memory)
            .map_err(|text| Error::Codec(format!("{name}: {text}")))?;
        macro_rules! typed {
            ($export:literal) => {
                instance
                    .get_typed_func(&mut store, $export)
                    .map_err(|err| Error::Codec(format!("{name}: {}: {err:#}", $export)))?
            };
        }
        let engine_features = match instance.get_func(&mut store, ENGINE_FEATURES_EXPORT) {
            Some(_) => Some(typed!("wirepool_engine_features")),
            None => None,
        };
        Ok(CodecInstance {
            abi_version: typed!("wirepool_abi_version"),
            engine_features,
            buffer: typed!("wirepool_buffer"),
            init: typed!("wirepool_init"),
            open: typed!("wirepool_open"),
            decode: typed!("wirepool_decode"),
            encode: typed!("wirepool_encode"),
            tick: typed!("wirepool_tick"),
            output: typed!("wirepool_output"),
            store,
            memory,
            stack,
            stack_used: false,
            limits: self.limits,
            epoch_budget,
        })
    }

    /// A call's budget in epoch ticks, `None` for none.
    fn epoch_budget(&self) -> Option<u64> {
        let ticks = self.limits.max_call?.as_micros() / EPOCH_TICK.as_micros();
        // One extra tick: the first may end at once.
        Some(u64::try_from(ticks).unwrap_or(u64::MAX - 1).max(1) + 1)
    }

    /// A fresh, initialised instance for one connection.
    pub fn instantiate(&self, connection_id: u64) -> Result<CodecInstance> {
        let mut instance = self.raw_instance(connection_id)?;
        // Copied out first: a guard in the call's arguments would hold the lock for the
        // whole init call, one connection's init after another, rotation waiting.
        let token = self.token.lock().clone();
        instance
            .init(&self.config_json, &token)
            .map_err(|failure| Error::Codec(format!("{}: {}", self.name, failure.0)))?;
        Ok(instance)
    }
}

/// The whole host pages of the codec's declared shadow stack, as offsets into its
/// memory, or `None` if it declares none (or one smaller than a page).
fn shadow_stack(
    instance: &wasmtime::Instance,
    store: &mut Store<HostState>,
    memory: &Memory,
) -> std::result::Result<Option<std::ops::Range<usize>>, String> {
    let mut bound = |name: &str| {
        instance.get_global(&mut *store, name).map(|global| {
            global
                .get(&mut *store)
                .i32()
                .map(|value| value as u32 as usize)
        })
    };
    let (Some(Some(low)), Some(Some(high))) = (bound(STACK_LOW), bound(STACK_HIGH)) else {
        // Checked at load: both or neither, each an i32.
        return Ok(None);
    };
    let size = memory.data_size(&*store);
    if low > high || high > size {
        return Err(format!(
            "{STACK_LOW} ({low:#x}) and {STACK_HIGH} ({high:#x}) are not a range inside its \
             memory ({size:#x} bytes)"
        ));
    }
    let page = crate::connection::page_size();
    let pages = low.next_multiple_of(page)..high & !(page - 1);
    Ok((pages.start < pages.end).then_some(pages))
}

fn codec_log(caller: &mut Caller<'_, HostState>, level: i32, ptr: i32, len: i32) {
    let connection_id = caller.data().connection_id;
    let Some(memory) = caller
        .get_export("memory")
        .and_then(|export| export.into_memory())
    else {
        return;
    };
    let data = memory.data(&caller);
    let (Ok(start), Ok(len)) = (usize::try_from(ptr), usize::try_from(len)) else {
        return;
    };
    let Some(bytes) = start
        .checked_add(len.min(4096))
        .and_then(|end| data.get(start..end))
    else {
        return;
    };
    let text = String::from_utf8_lossy(bytes);
    let level = match level {
        1 => log::Level::Error,
        2 => log::Level::Warn,
        3 => log::Level::Info,
        4 => log::Level::Debug,
        _ => log::Level::Trace,
    };
    log::log!(target: "wirepool::codec", level, "connection {connection_id}: {text}");
}

/// Why a codec call failed: the connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CodecFailure(pub String);

impl std::fmt::Display for CodecFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One connection's codec instance.
pub(crate) struct CodecInstance {
    store: Store<HostState>,
    memory: Memory,
    /// Whole pages of the shadow stack the codec declares, if any.
    stack: Option<std::ops::Range<usize>>,
    /// A call has run since the stack was last released.
    stack_used: bool,
    abi_version: TypedFunc<(), i32>,
    engine_features: Option<TypedFunc<i32, ()>>,
    buffer: TypedFunc<i32, i32>,
    init: TypedFunc<(i32, i32), i32>,
    open: TypedFunc<(), i32>,
    decode: TypedFunc<(i32, i32), i32>,
    encode: TypedFunc<(i32, i64, i32, i32), i32>,
    tick: TypedFunc<i64, i32>,
    output: TypedFunc<(), i64>,
    limits: CodecLimits,
    /// Each call's budget in epoch ticks; `None`: no budget (not interruptible).
    epoch_budget: Option<u64>,
}

type CallResult<T> = std::result::Result<T, CodecFailure>;

impl CodecInstance {
    /// Before each call: a fresh time budget, and the stack marked as used.
    fn arm(&mut self) {
        if let Some(ticks) = self.epoch_budget {
            self.store.set_epoch_deadline(ticks);
        }
        self.stack_used = true;
    }

    /// Gives the pages of the codec's shadow stack back to the system, if it declares
    /// one and a call has run since the last time: between calls it holds nothing,
    /// and a page the next call touches comes back zeroed. For idle connections (one
    /// page each, most of the time: its top).
    pub fn release_stack(&mut self) {
        if !std::mem::take(&mut self.stack_used) {
            return;
        }
        let Some(pages) = self.stack.clone() else {
            return;
        };
        let data = self.memory.data_mut(&mut self.store);
        let base = data.as_mut_ptr() as usize;
        if pages.end > data.len() || base % crate::connection::page_size() != 0 {
            return;
        }
        // Elsewhere MADV_DONTNEED need not zero the pages.
        #[cfg(target_os = "linux")]
        // SAFETY: [base + start, base + end) lies inside the memory we hold `&mut`
        // to, on whole pages (the memory is page-aligned): no call is running, so
        // the shadow stack holds nothing, and MADV_DONTNEED on wasmtime's private
        // mappings only makes those bytes read back as zeros (or as the module's
        // initial image, for a page a data segment shares), like a write would.
        unsafe {
            libc::madvise(
                (base + pages.start) as *mut libc::c_void,
                pages.end - pages.start,
                libc::MADV_DONTNEED,
            );
        }
    }

    fn abi_version(&mut self) -> Result<i32> {
        self.arm();
        self.abi_version.call(&mut self.store, ()).map_err(|err| {
            Error::Codec(describe_call_error(
                "wirepool_abi_version",
                &err,
                &self.limits,
            ))
        })
    }

    /// Asks the codec for an input buffer of `len` bytes and returns it.
    fn input(&mut self, len: usize) -> CallResult<&mut [u8]> {
        let start = self.input_offset(len)?;
        Ok(&mut self.memory.data_mut(&mut self.store)[start..start + len])
    }

    /// Asks the codec for an input buffer of `len` bytes; its offset in the memory,
    /// checked to hold `len` bytes.
    fn input_offset(&mut self, len: usize) -> CallResult<usize> {
        let size = i32::try_from(len)
            .map_err(|_| CodecFailure(format!("input of {len} bytes is too large")))?;
        self.arm();
        let ptr = self.buffer.call(&mut self.store, size).map_err(|err| {
            CodecFailure(describe_call_error("wirepool_buffer", &err, &self.limits))
        })?;
        if ptr == 0 && len > 0 {
            return Err(CodecFailure(format!(
                "wirepool_buffer could not provide {len} bytes"
            )));
        }
        let start = ptr as u32 as usize;
        let data = self.memory.data(&self.store);
        let end = start.checked_add(len).filter(|end| *end <= data.len());
        match end {
            Some(_) => Ok(start),
            None => Err(CodecFailure(format!(
                "wirepool_buffer returned {start:#x}, which with {len} bytes lies outside its memory ({} bytes)",
                data.len()
            ))),
        }
    }

    fn finish(&mut self, export: &str, code: wasmtime::Result<i32>) -> CallResult<Records<'_>> {
        self.finish_with_input(export, code, None)
    }

    /// [`finish`](Self::finish) of a call whose input (`DATA_IN_INPUT` records point
    /// into it) is at `input` in the codec's memory.
    fn finish_with_input(
        &mut self,
        export: &str,
        code: wasmtime::Result<i32>,
        input: Option<std::ops::Range<usize>>,
    ) -> CallResult<Records<'_>> {
        let code =
            code.map_err(|err| CodecFailure(describe_call_error(export, &err, &self.limits)))?;
        if code != 0 {
            return Err(CodecFailure(format!("{export} returned error code {code}")));
        }
        self.arm();
        let packed = self.output.call(&mut self.store, ()).map_err(|err| {
            CodecFailure(describe_call_error("wirepool_output", &err, &self.limits))
        })?;
        let ptr = ((packed as u64) >> 32) as usize;
        let len = (packed as u64 & 0xffff_ffff) as usize;
        let data = self.memory.data(&self.store);
        let bytes = ptr
            .checked_add(len)
            .and_then(|end| data.get(ptr..end))
            .ok_or_else(|| {
                CodecFailure(format!(
                    "wirepool_output points at {len} bytes at {ptr:#x}, outside its memory ({} bytes)",
                    data.len()
                ))
            })?;
        // The input's range was checked to fit when the engine wrote it, and a memory
        // cannot shrink: a miss here is the engine's own fault, said as such.
        let input = input
            .map(|range| {
                data.get(range.clone()).ok_or_else(|| {
                    CodecFailure(format!(
                        "internal error: the input of {export} ({range:?}) no longer fits \
                         the codec's memory ({} bytes)",
                        data.len()
                    ))
                })
            })
            .transpose()?;
        Ok(Records::new(bytes, input))
    }

    /// [`finish`](Self::finish) with every record's framing checked before any is
    /// acted on: for the calls whose output is small (all but decode's), so that a
    /// codec failing there fails before anything it asked for happens.
    fn finish_checked(
        &mut self,
        export: &str,
        code: wasmtime::Result<i32>,
    ) -> CallResult<Records<'_>> {
        let records = self.finish(export, code)?;
        match records.count() {
            Ok(_) => Ok(records),
            Err(err) => Err(CodecFailure(format!("{export}'s output: {err}"))),
        }
    }

    fn init(&mut self, config: &[u8], token: &[u8]) -> CallResult<()> {
        if let Some(engine_features) = self.engine_features.clone() {
            self.arm();
            engine_features
                .call(&mut self.store, feature::ALL)
                .map_err(|err| {
                    CodecFailure(describe_call_error(
                        ENGINE_FEATURES_EXPORT,
                        &err,
                        &self.limits,
                    ))
                })?;
        }
        let input = self.input(config.len() + token.len())?;
        input[..config.len()].copy_from_slice(config);
        input[config.len()..].copy_from_slice(token);
        self.arm();
        let code = self
            .init
            .call(&mut self.store, (config.len() as i32, token.len() as i32));
        self.finish_checked("wirepool_init", code).map(|_| ())
    }

    /// The WebSocket is open.
    pub fn open(&mut self) -> CallResult<Records<'_>> {
        self.arm();
        let code = self.open.call(&mut self.store, ());
        self.finish_checked("wirepool_open", code)
    }

    /// Adds a frame to `frames`, writing it straight into the codec's input buffer in
    /// the ABI's decode layout (no copy on the host's side). The first frame of a batch
    /// asks the codec for a buffer as big as the batches that filled one before
    /// (doubling each time one did, up to [`FrameBatch::MAX_BYTES`]), so a quiet
    /// connection's codec keeps a small buffer. `Ok(false)`: the frame does not fit
    /// beside the frames already there; decode them, then add it to the next batch.
    pub fn add_frame(
        &mut self,
        frames: &mut FrameBatch,
        body: &[u8],
        binary: bool,
    ) -> CallResult<bool> {
        let needed = FrameBatch::HEADER + body.len();
        if frames.count == 0 {
            let size = needed.max(frames.goal);
            frames.start = self
                .input_offset(size)
                // The first frame of the batch: the batch is this frame.
                .map_err(|failure| FrameBatch::context(failure, 1, needed))?;
            frames.capacity = size;
            frames.used = 0;
        } else if frames.used + needed > frames.capacity {
            frames.goal = (frames.capacity * 2)
                .max(frames.used + needed)
                .min(FrameBatch::MAX_BYTES);
            return Ok(false);
        }
        let at = frames.start + frames.used;
        let data = self.memory.data_mut(&mut self.store);
        // A batch is larger than the first-level cache: ask for the lines ahead (in
        // the buffer only).
        if frames.used + needed + crate::prefetch::AHEAD_BYTES < frames.capacity {
            crate::prefetch::for_write(
                data.as_ptr()
                    .wrapping_add(at + needed + crate::prefetch::AHEAD_BYTES),
            );
        }
        // In range: the buffer was checked to hold `capacity` bytes, and nothing ran
        // in the module since.
        let Some(slot) = data.get_mut(at..at + needed) else {
            return Err(CodecFailure(format!(
                "the input buffer at {:#x} no longer fits its memory ({} bytes)",
                frames.start,
                data.len()
            )));
        };
        let length = u32::try_from(body.len()).unwrap_or(u32::MAX);
        slot[..4].copy_from_slice(&length.to_le_bytes());
        slot[4..8].copy_from_slice(&u32::from(binary).to_le_bytes());
        slot[8..].copy_from_slice(body);
        frames.used += needed;
        frames.count += 1;
        Ok(true)
    }

    /// Decodes the frames [`add_frame`](Self::add_frame) laid out, and empties `frames`.
    /// The records' framing is checked as they are iterated: those before a broken one
    /// are good records of frames read from the wire, and are acted on.
    pub fn decode(&mut self, frames: &mut FrameBatch) -> CallResult<Records<'_>> {
        let (count, bytes, start) = (frames.count, frames.used, frames.start);
        frames.count = 0;
        frames.used = 0;
        let context = move |failure: CodecFailure| FrameBatch::context(failure, count, bytes);
        self.arm();
        let code = self
            .decode
            .call(&mut self.store, (count as i32, bytes as i32));
        self.finish_with_input("wirepool_decode", code, Some(start..start + bytes))
            .map_err(context)
    }

    /// Encodes one outbound command.
    pub fn encode(
        &mut self,
        operation: i32,
        id: i64,
        channel: &[u8],
        payload: &[u8],
    ) -> CallResult<Records<'_>> {
        let channel_len = i32::try_from(channel.len())
            .map_err(|_| CodecFailure("channel name too long".into()))?;
        let payload_len = i32::try_from(payload.len())
            .map_err(|_| CodecFailure("payload too long for the codec".into()))?;
        let input = self.input(channel.len() + payload.len())?;
        input[..channel.len()].copy_from_slice(channel);
        input[channel.len()..].copy_from_slice(payload);
        self.arm();
        let code = self
            .encode
            .call(&mut self.store, (operation, id, channel_len, payload_len));
        self.finish_checked("wirepool_encode", code)
    }

    /// The periodic tick.
    pub fn tick(&mut self, now_ms: i64) -> CallResult<Records<'_>> {
        self.arm();
        let code = self.tick.call(&mut self.store, now_ms);
        self.finish_checked("wirepool_tick", code)
    }
}

/// The inbound frames of one decode call, laid out in the ABI's decode format in the
/// codec's own input buffer by [`CodecInstance::add_frame`]; kept by the worker
/// between batches, with the buffer size to ask for.
#[derive(Default)]
pub(crate) struct FrameBatch {
    /// The input buffer's offset in the codec's memory, and its size.
    start: usize,
    capacity: usize,
    /// Bytes and frames written so far.
    used: usize,
    count: usize,
    /// The buffer size the next batch asks for.
    goal: usize,
}

impl FrameBatch {
    /// Most bytes per decode call (a single larger frame still goes alone).
    pub(crate) const MAX_BYTES: usize = 256 * 1024;
    /// Most frames per decode call.
    pub(crate) const MAX_FRAMES: usize = 1024;
    /// Each frame's length and flags before its body.
    const HEADER: usize = 8;

    /// A batch whose first buffer holds `bytes` (frames and their headers).
    #[cfg(test)]
    pub fn with_goal(bytes: usize) -> FrameBatch {
        FrameBatch {
            goal: bytes,
            ..FrameBatch::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn is_full(&self) -> bool {
        self.count >= Self::MAX_FRAMES || self.used >= Self::MAX_BYTES
    }

    pub fn len(&self) -> usize {
        self.count
    }

    /// `failure` with the size of the batch it happened on.
    fn context(CodecFailure(text): CodecFailure, count: usize, bytes: usize) -> CodecFailure {
        CodecFailure(format!(
            "{text} (decoding {count} frame(s), {bytes} bytes in all; a codec's memory \
             limit, codec.max_memory_mb, bounds the messages it can take)"
        ))
    }
}

/// Checks a module file against the ABI (the `codec-check` command).
pub fn check_module_file(path: &str) -> Result<String> {
    let config = CodecConfig {
        path: Some(path.to_string()),
        ..CodecConfig::default()
    };
    let runtime = CodecRuntime::load(&CodecSource::File(path.to_string()), &config, None)?;
    // A real instance runs init and open, the way a connection would.
    let mut instance = runtime.instantiate(0)?;
    let records = instance
        .open()
        .map_err(|failure| Error::Codec(format!("{path}: {failure}")))?;
    let count = records
        .count()
        .map_err(|err| Error::Codec(format!("{path}: wirepool_open's output: {err}")))?;
    let declared = runtime
        .instance_pre
        .module()
        .get_export(STACK_LOW)
        .is_some();
    let stack = match (&instance.stack, declared) {
        (Some(pages), _) if cfg!(target_os = "linux") => format!(
            "its shadow stack ({} KiB) is given back while idle",
            (pages.end - pages.start) / 1024
        ),
        (Some(_), _) => "its shadow stack is declared (given back while idle on Linux only)".into(),
        (None, true) => {
            "its declared shadow stack holds no whole page: nothing to give back".into()
        }
        (None, false) => {
            "no shadow stack declared (__stack_low/__stack_high, docs/codec-abi.md)".into()
        }
    };
    Ok(format!(
        "{path}: codec ABI v{ABI_VERSION} ok (init and open succeeded within the {} ms call \
         budget a codec loaded from a file has by default, open emitted {count} record(s)); \
         {stack}",
        crate::config::DEFAULT_MAX_CALL_MS
    ))
}

#[cfg(test)]
mod tests;
